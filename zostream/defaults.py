"""The API's documented defaults and limits, in one place.

The server (server/convert*.py), the engine's configs, the CLI and the Python client read these
values; the proto comments state them, and tests/server/test_contract.py checks that each comment
says what `DOCUMENTED` below says and that a live server does it. Change a default here, then the
comment it names, then regenerate the stubs.

This module imports nothing but the standard library: a client-only install has it.
"""

from __future__ import annotations

import math
import re

# ---- generation ------------------------------------------------------------------------------------
TEMPERATURE = 0.0  # unset temperature: greedy, as `zostream generate` and the README say
TOP_P = 1.0
REPETITION_PENALTY = 1.0
MAX_NEW_TOKENS = 256  # StoppingCriteria.max_new_tokens = 0, capped by the server's --max-new-tokens
SERVER_MAX_NEW_TOKENS = 1024  # `zostream serve --max-new-tokens`: the most a request may ask for
SERVER_MAX_SEQ_LEN = 2048  # `zostream serve --max-seq-len`
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
INCLUDE_STOP_SEQUENCE = False  # the matched stop sequence is cut from the text
MAX_PROMPT_CHARS = 1_000_000
MAX_CHAT_MESSAGES = 256
MAX_ID_CHARS = 128  # request ids, display names, idempotency keys
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20
MAX_N = 16  # completions from one prompt

# ---- names and pages --------------------------------------------------------------------------------
NAME_MAX_CHARS = 128
# A LoRA job's step N as an adapter / OpenAI model id: "<job_id>:ckpt-step-<N>" (names never hold ':').
CHECKPOINT_SUFFIX = ":ckpt-step-"
# Datasets and adapters are named, never addressed by path: no separators, no leading '.'.
NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX_CHARS - 1}}}")
MAX_PAGE_SIZE = 1000
PAGE_SIZE = {
    "ListDatasets": 100,
    "ListJobs": 50,
    "ListJobEvents": 100,
    "ListCheckpoints": 100,
    "ListAdapters": 100,
}

# ---- fine-tuning hyperparameters (Hyperparameters and `zostream train`) -----------------------------
STEPS = 100  # the CLI's default; the API requires steps
BATCH_SIZE = 8
# Unset estimator: auto. It resolves to mezo when q = 1 is asked for, else grzo (fzoo when q groups do not
# divide the batch), for LoRA and full alike (engine/config.py: ZOConfig). bench/finetune.py measures them.
ESTIMATOR = "auto"
Q = 1  # mezo's directions per step
LR = {"full": 1e-6, "lora": 1e-4}  # mezo
EPS = 1e-3  # mezo, both methods (MeZO's value)
# fzoo: unit-scale coefficients, so the lr is the step per coordinate. LoRA factors are O(1e-2) and move
# ~lr per step. Full-parameter 1e-3: on the sentiment bench (SmolLM2-135M, batch 16, bf16 weights with
# stochastic rounding) 2e-5 left held-out accuracy at the base's 0.453 for 1,200 forwards, 2e-4 reached
# 0.53, 5e-4 0.89 and 1e-3 0.95 (bench/RESULTS.md); the slow-climb guard backs it off if the loss climbs.
FZOO_Q = 4
FZOO_LR = {"lora": 5e-3, "full": 1e-3}
FZOO_EPS = {"lora": 1e-2, "full": 1e-3}
# grzo: unit-RMS coefficients, q groups of the batch per ± pair, and by default a cosine decay of
# the lr over the job (a fixed-size step otherwise keeps the loss at its noise floor). q 4 (groups of B/4
# records): at batch 16, groups of 4 beat one direction per record (q 16) on the sentiment bench. Full
# parameters: lr 2e-3 (cosine) reached >= 0.85 held-out accuracy on the sentiment bench within 1,200 forwards
# on 3 of 3 seeds, where fzoo at 1e-3 constant did on 2 (bench/RESULTS.md).
GRZO_Q = 4
GRZO_LR = {"lora": 1e-2, "full": 2e-3}
GRZO_EPS = {"lora": 1e-2, "full": 1e-3}
# What a LoRA job evaluates, exports and serves: an exponential moving average of its factors with this
# decay (a window of about 10 steps; engine/averaging.py), 0 for full-parameter jobs (it would be a second
# copy of every weight). Measured on both bench tasks against the last iterate, 0.95 and a warmed-up decay
# (bench/RESULTS.md, "iterate averaging").
AVERAGE_DECAY = {"lora": 0.9, "full": 0.0}
LORA_R = 8
LORA_ALPHA_PER_R = 2.0  # unset alpha: 2r (scale 2.0), MeZO's LoRA setting (r 8, alpha 16)
LORA_TARGETS = ("q_proj", "v_proj")
# LoRA's A factors start at this multiple of PEFT's init bound (1/sqrt(in)); B starts at 0. PEFT's own: a
# larger A starts faster and ends lower (bench/RESULTS.md, "a larger LoRA A at the start").
LORA_INIT_SCALE = 1.0
LORA_INIT_SCALE_MAX = 100.0


def lora_init_scale_ok(s: object) -> bool:
    """A LoRA init scale any layer accepts (config, adapter spec, a log's scope): a number in (0, MAX]."""
    ok = isinstance(s, int | float) and not isinstance(s, bool)
    return ok and math.isfinite(s) and 0 < s <= LORA_INIT_SCALE_MAX


MAX_LEN = 512
CHECKPOINT_EVERY = 0  # no intermediate checkpoints; the result is exported after the last step
EVAL_EVERY = 0
KEEP_BEST = False  # export the last step's weights, not the best evaluated step's
EARLY_STOPPING_PATIENCE = 0  # off
# Master dtype of the trained weights: LoRA always trains float32 masters; FULL keeps the base dtype.
LORA_MASTER_DTYPE = "float32"


def lora_alpha(r: int) -> float:
    return LORA_ALPHA_PER_R * r


def check_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and ".." not in name


def _g(x: float, fmt: str = "g") -> str:
    """A number as the proto comments write it: 0, 2, 0.001, 1e-6."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", format(x, fmt)).replace("e+", "e")


# Field (as "Message.field" of the v1 protos) -> a phrase its comment must contain. Built from the values
# above, so a default changed here and not in the proto fails the contract test.
DOCUMENTED: dict[str, str] = {
    "SamplingParams.temperature": f"Unset: {_g(TEMPERATURE)} (greedy)",
    "SamplingParams.top_p": f"Unset: {TOP_P!r} (off)",
    "SamplingParams.repetition_penalty": f"Unset: {REPETITION_PENALTY!r} (off)",
    "StoppingCriteria.max_new_tokens": f"0 (default): {MAX_NEW_TOKENS}",
    "StoppingCriteria.stop": f"At most {MAX_STOP_SEQUENCES}, each 1-{MAX_STOP_CHARS} characters",
    "StoppingCriteria.include_stop_sequence": "false (default): the matched sequence is cut",
    "GenerateRequest.request_id": f"up to {MAX_ID_CHARS} characters",
    "GenerateRequest.n": f"0 or 1 (default): one; at most {MAX_N}",
    "LogprobsParams.top_logprobs": f"0 (default) to {MAX_TOP_LOGPROBS}, at most {MAX_TOP_LOGPROBS}",
    "Hyperparameters.batch_size": f"0: {BATCH_SIZE}",
    "Hyperparameters.q": f"0: the estimator's: {GRZO_Q} groups with grzo, {FZOO_Q} with fzoo, {Q} with mezo",
    "Hyperparameters.learning_rate": (
        f"Unset: the estimator's: grzo {_g(GRZO_LR['lora'], '.0e')} for LORA, "
        f"{_g(GRZO_LR['full'], '.0e')} for FULL; fzoo {_g(FZOO_LR['lora'], '.0e')} for LORA, "
        f"{_g(FZOO_LR['full'], '.0e')} for FULL; mezo {_g(LR['lora'], '.0e')} for LORA, "
        f"{_g(LR['full'], '.0e')} for FULL"
    ),
    "Hyperparameters.eps": (
        f"Unset: grzo {_g(GRZO_EPS['lora'], '.0e')} for LORA, {_g(GRZO_EPS['full'], '.0e')} for FULL; "
        f"fzoo {_g(FZOO_EPS['lora'], '.0e')} for LORA, "
        f"{_g(FZOO_EPS['full'], '.0e')} for FULL; mezo {_g(EPS, '.0e')}"
    ),
    "Hyperparameters.estimator": f'Empty: "{ESTIMATOR}"',
    "Hyperparameters.max_len": f"0: {MAX_LEN}",
    "Hyperparameters.checkpoint_every": f"{CHECKPOINT_EVERY} (default): none before the last step",
    "Hyperparameters.master_dtype": f"Empty: {LORA_MASTER_DTYPE} for LORA, the base dtype for FULL",
    "Hyperparameters.seed": "Unset: the server picks one",
    "Hyperparameters.keep_best": f"{str(KEEP_BEST).lower()} (default): the last step's",
    "Hyperparameters.early_stopping_patience": f"{EARLY_STOPPING_PATIENCE} (default): off",
    "GenerateRequest.adapter_id": f'"<job_id>{CHECKPOINT_SUFFIX}<N>"',
    "Checkpoint.adapter_id": f'"<job_id>{CHECKPOINT_SUFFIX}<N>" for a LORA job',
    "DownloadWeightsRequest.upto": "Unset (default): the result or the checkpoint",
    "ExportUpdateLogRequest.upto": "Unset (default): every step logged",
    "Hyperparameters.average_decay": f"Unset: {_g(AVERAGE_DECAY['lora'])} for LORA",
    "LoraConfig.r": f"0: {LORA_R}",
    "LoraConfig.alpha": f"Unset: {_g(LORA_ALPHA_PER_R)} * r",
    "LoraConfig.init_scale": (
        f"In (0, {_g(LORA_INIT_SCALE_MAX)}]; 1 is PEFT's init. Unset: {_g(LORA_INIT_SCALE)}"
    ),
    "LoraConfig.target_modules": "Empty: [" + ", ".join(f'"{t}"' for t in LORA_TARGETS) + "]",
    "DatasetMetadata.name": f"1-{NAME_MAX_CHARS} characters",
    "ImportUpdateLogMetadata.adapter_id": f"1-{NAME_MAX_CHARS} characters",
    "CreateJobRequest.display_name": f"up to {MAX_ID_CHARS} characters",
    "ListDatasetsRequest.page_size": f"0: {PAGE_SIZE['ListDatasets']}; at most {MAX_PAGE_SIZE}",
    "ListJobsRequest.page_size": f"0: {PAGE_SIZE['ListJobs']}; at most {MAX_PAGE_SIZE}",
    "ListJobEventsRequest.page_size": f"0: {PAGE_SIZE['ListJobEvents']}; at most {MAX_PAGE_SIZE}",
    "ListCheckpointsRequest.page_size": f"0: {PAGE_SIZE['ListCheckpoints']}; at most {MAX_PAGE_SIZE}",
    "ListAdaptersRequest.page_size": f"0: {PAGE_SIZE['ListAdapters']}; at most {MAX_PAGE_SIZE}",
}
