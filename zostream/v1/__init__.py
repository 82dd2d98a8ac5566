"""Generated gRPC stubs of the public API (proto/zostream/v1/*.proto); regenerate with tools/gen_protos.py.

Modules: common_pb2, generation_pb2(_grpc), finetuning_pb2(_grpc), adapters_pb2(_grpc).
"""
