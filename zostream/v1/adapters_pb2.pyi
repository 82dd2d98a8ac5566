import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from zostream.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATUS_UNSPECIFIED: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_TRAINING: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_READY: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_STOPPED: _ClassVar[AdapterStatus]
ADAPTER_STATUS_UNSPECIFIED: AdapterStatus
ADAPTER_STATUS_TRAINING: AdapterStatus
ADAPTER_STATUS_READY: AdapterStatus
ADAPTER_STATUS_STOPPED: AdapterStatus

class Adapter(_message.Message):
    __slots__ = ("id", "display_name", "kind", "base_fingerprint", "steps", "source_job_id", "created_at", "size_bytes", "status", "lora", "update_log_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    UPDATE_LOG_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    display_name: str
    kind: _common_pb2.TuningMethod
    base_fingerprint: str
    steps: int
    source_job_id: str
    created_at: _timestamp_pb2.Timestamp
    size_bytes: int
    status: AdapterStatus
    lora: _common_pb2.LoraConfig
    update_log_bytes: int
    def __init__(self, id: _Optional[str] = ..., display_name: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.TuningMethod, str]] = ..., base_fingerprint: _Optional[str] = ..., steps: _Optional[int] = ..., source_job_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., size_bytes: _Optional[int] = ..., status: _Optional[_Union[AdapterStatus, str]] = ..., lora: _Optional[_Union[_common_pb2.LoraConfig, _Mapping]] = ..., update_log_bytes: _Optional[int] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportUpdateLogRequest(_message.Message):
    __slots__ = ("adapter_id", "job_id", "upto")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    UPTO_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    job_id: str
    upto: int
    def __init__(self, adapter_id: _Optional[str] = ..., job_id: _Optional[str] = ..., upto: _Optional[int] = ...) -> None: ...

class ExportUpdateLogResponse(_message.Message):
    __slots__ = ("chunk", "total_bytes")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    total_bytes: int
    def __init__(self, chunk: _Optional[bytes] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class ImportUpdateLogMetadata(_message.Message):
    __slots__ = ("adapter_id", "display_name")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    display_name: str
    def __init__(self, adapter_id: _Optional[str] = ..., display_name: _Optional[str] = ...) -> None: ...

class DownloadWeightsRequest(_message.Message):
    __slots__ = ("adapter_id", "job_id", "checkpoint", "upto")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    UPTO_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    job_id: str
    checkpoint: str
    upto: int
    def __init__(self, adapter_id: _Optional[str] = ..., job_id: _Optional[str] = ..., checkpoint: _Optional[str] = ..., upto: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("path", "chunk", "file_bytes", "total_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    chunk: bytes
    file_bytes: int
    total_bytes: int
    def __init__(self, path: _Optional[str] = ..., chunk: _Optional[bytes] = ..., file_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class ImportPeftAdapterMetadata(_message.Message):
    __slots__ = ("adapter_id", "display_name")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    display_name: str
    def __init__(self, adapter_id: _Optional[str] = ..., display_name: _Optional[str] = ...) -> None: ...

class ImportPeftAdapterRequest(_message.Message):
    __slots__ = ("metadata", "file")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    metadata: ImportPeftAdapterMetadata
    file: FileChunk
    def __init__(self, metadata: _Optional[_Union[ImportPeftAdapterMetadata, _Mapping]] = ..., file: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class ImportUpdateLogRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: ImportUpdateLogMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[ImportUpdateLogMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...
