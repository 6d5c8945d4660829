"""Nothing stale, corrupt or lying is served: packs written by rename, stale packs refused,
non-regular files refused, descriptors bounded on errors, header lies and bad config or
tokenizer files named in one line before mlx reads a weight."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import threading

import mlx_lm
import pytest

import outlier_runtime
from outlier_runtime import CheckpointError, ExpertReadError
from outlier_runtime.core.model_files import ModelFileError
from outlier_runtime.core.plugin_manager import get_registry
from outlier_runtime.core.protocols import ReadRequest
from outlier_runtime.engine.buffers import aligned_empty
from outlier_runtime.engine.pack import PACK_DIR, pack_model

PROMPT = "import os\n\ndef walk(path):\n    for name in os.listdir(path):\n"
SWITCH = "model.layers.0.mlp.switch_mlp.gate_proj."


@pytest.fixture
def model_copy(tiny, tmp_path):
    """A private copy of a tiny MoE (one shard) that a test may damage."""
    target = tmp_path / "model"
    shutil.copytree(tiny("qwen3_moe"), target)
    return target


def _stock_tokens(path):
    model, tokenizer = mlx_lm.load(str(path))
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=8)]


def _load(path, **overrides):
    options = dict(model=str(path), k_override=2, cache_gb=0, force=True)
    options.update(overrides)
    return outlier_runtime.load("plus", **options)


def _tokens(runtime):
    return runtime.generate(PROMPT, max_tokens=8, temperature=0.0, chat=False).tokens


def _header(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw, length, json.loads(raw[8:8 + length])


def _rewrite_header(path, change):
    """Apply ``change`` to the shard's header in place, keeping its length (padded with spaces)."""
    raw, length, header = _header(path)
    change(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= length
    path.write_bytes(raw[:8] + new.ljust(length) + raw[8 + length:])
    index = path.parent / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: path.name for k in header if k != "__metadata__"}
        index.write_text(json.dumps(data))


# ------------------------------------------------------------------ packs


def test_a_pack_older_than_a_same_size_edit_of_its_shard_is_refused(model_copy, caplog):
    pack_model(model_copy)
    shard = model_copy / "model.safetensors"
    raw, length, header = _header(shard)
    start = 8 + length + header[SWITCH + "weight"]["data_offsets"][0]
    with open(shard, "r+b") as handle:  # same size, same header: only the expert bytes change
        handle.seek(start)
        handle.write(bytes(b ^ 0x5A for b in raw[start:start + 64]))
    expected = _stock_tokens(model_copy)
    with caplog.at_level(logging.WARNING):
        runtime = _load(model_copy)
    try:
        pack = runtime.engine_stats()["config"]["pack"]
        assert pack.startswith("refused") and "model.safetensors changed" in pack and "mtime_ns" in pack
        assert _tokens(runtime) == expected  # read from the shards, as they are now
    finally:
        runtime.close()
    assert sum("pack refused" in r.getMessage() for r in caplog.records) == 1


def test_repacking_replaces_files_and_never_rewrites_them(model_copy):
    pack_model(model_copy)
    layer = model_copy / PACK_DIR / "layer-000.bin"
    before = layer.read_bytes()
    inode = layer.stat().st_ino
    with open(layer, "rb") as held:  # what a running reader holds
        pack_model(model_copy)
        assert layer.stat().st_ino != inode
        assert held.read() == before  # the open file never changed under its reader
    assert layer.read_bytes() == before  # same shards, same pack
    assert not list((model_copy / PACK_DIR).glob("*.partial"))


def test_leftovers_of_an_interrupted_pack_are_reported_then_removed(model_copy, caplog):
    pack_model(model_copy)
    leftover = model_copy / PACK_DIR / "layer-001.bin.partial"
    leftover.write_bytes(b"\0" * 100_000)
    with caplog.at_level(logging.WARNING):
        runtime = _load(model_copy)
        runtime.close()
    assert any("interrupted" in r.getMessage() and "outlier pack" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pack_model(model_copy)
    assert not leftover.exists()
    assert any("removed 1 file(s)" in r.getMessage() for r in caplog.records)


def test_a_symlinked_pack_directory_is_refused(model_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (model_copy / PACK_DIR).symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="symlink"):
        pack_model(model_copy)
    assert not list(elsewhere.iterdir())


def test_checksum_coverage_is_reported(model_copy, caplog):
    pack_model(model_copy, checksums=False)
    with caplog.at_level(logging.WARNING):
        runtime = _load(model_copy, verify_checksums=True)
    try:
        assert runtime.engine_stats()["config"]["checksums"].startswith("nothing to verify")
    finally:
        runtime.close()
    assert any("--no-checksums" in r.getMessage() for r in caplog.records)
    pack_model(model_copy)
    runtime = _load(model_copy, verify_checksums=True)
    try:
        assert runtime.engine_stats()["config"]["checksums"] == "verified"
    finally:
        runtime.close()


@pytest.mark.parametrize("reader", ["pread", "mmap", "fanout"])
def test_repacking_beside_a_serving_engine_never_fails_or_changes_text(model_copy, reader):
    pack_model(model_copy)
    expected = _stock_tokens(model_copy)
    runtime = _load(model_copy, reader=reader)
    stop = threading.Event()
    errors: list[BaseException] = []

    def repack() -> None:
        try:
            while not stop.is_set():
                pack_model(model_copy)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    packer = threading.Thread(target=repack)
    packer.start()
    try:
        assert runtime.engine_stats()["config"]["pack"] == "used"
        for _ in range(4):
            assert _tokens(runtime) == expected
    finally:
        stop.set()
        packer.join(60)
        runtime.close()
    assert not errors


# ------------------------------------------------------------------ files and descriptors


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
@pytest.mark.parametrize("reader", ["pread", "mmap", "fanout"])
def test_a_thousand_failed_reads_leave_the_descriptor_count_flat(reader, tmp_path):
    data = tmp_path / "short.bin"
    data.write_bytes(b"x" * 8192)
    instance = get_registry().create("reader", reader)
    buffer = aligned_empty(4096)
    try:
        instance.read([ReadRequest(str(data), 0, 4096, memoryview(buffer))])
        before = _open_fds()
        for _ in range(1000):
            with pytest.raises(ExpertReadError):
                instance.read([ReadRequest(str(data), 8192, 4096, memoryview(buffer))])  # past the end
        assert _open_fds() <= before + 2
    finally:
        instance.close()


@pytest.mark.parametrize("reader", ["pread", "mmap", "fanout"])
def test_a_fifo_is_refused_not_waited_on(reader, tmp_path):
    fifo = tmp_path / "shard.safetensors"
    os.mkfifo(fifo)
    instance = get_registry().create("reader", reader)
    try:
        with pytest.raises(ExpertReadError, match="not a regular file"):
            instance.read([ReadRequest(str(fifo), 0, 16, memoryview(bytearray(16)))])
    finally:
        instance.close()


def test_a_fifo_in_a_shards_place_is_refused_at_load(model_copy):
    shard = model_copy / "model.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            _load(model_copy).close()
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "open() of the FIFO hung"
    assert isinstance(outcome[0], CheckpointError) and "not a regular file (a FIFO)" in str(outcome[0])


def test_the_mmap_reader_refuses_a_file_truncated_in_place(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(b"y" * 65536)
    reader = get_registry().create("reader", "mmap")
    out = bytearray(4096)
    try:
        reader.read([ReadRequest(str(data), 61440, 4096, memoryview(out))])
        with open(data, "r+b") as handle:
            handle.truncate(4096)
        with pytest.raises(ExpertReadError, match="file ends at byte 4096"):
            reader.read([ReadRequest(str(data), 61440, 4096, memoryview(out))])  # would be SIGBUS
    finally:
        reader.close()


# ------------------------------------------------------------------ header lies


def _dtype(dtype):
    return lambda header: header[SWITCH + ("weight" if dtype == "I32w" else "scales")].update(dtype="I32")


LIES = {
    "weight I32 for U32": (_dtype("I32w"), ["weight", "is I32", "U32"]),
    "scales I32 for F32": (_dtype("I32s"), ["scales", "is I32", "float"]),
    "expert count": (lambda h: h[SWITCH + "weight"].update(shape=[32, 64, 16]), ["weight", "[16, 128, 16]",
                                                                                 "[32, 64, 16]"]),
    "renamed tensor": (lambda h: h.__setitem__(SWITCH + "wEight", h.pop(SWITCH + "weight")),
                       ["weight'", "wEight", "renamed"]),
}


@pytest.mark.parametrize("lie", list(LIES))
@pytest.mark.parametrize("entry_point", ["load", "dense", "pack"])
def test_header_lies_are_named_before_mlx_reads_a_weight(model_copy, lie, entry_point):
    change, words = LIES[lie]
    _rewrite_header(model_copy / "model.safetensors", change)
    with pytest.raises(CheckpointError) as error:
        if entry_point == "load":
            _load(model_copy).close()
        elif entry_point == "dense":  # the dense loader reads every weight: named before it does
            outlier_runtime.load("nano", model=str(model_copy), force=True).close()
        else:
            pack_model(model_copy)
    message = str(error.value)
    assert "\n" not in message and "config.json" in message
    assert all(word in message for word in words), message
    assert "model.safetensors" in message or lie == "renamed tensor"


# ------------------------------------------------------------------ config and tokenizer files

BAD_FILES = {
    "config empty": ("config.json", lambda p: p.write_text(""), "empty"),
    "config garbage": ("config.json", lambda p: p.write_bytes(b"\xff{garbage"), "not valid UTF-8 JSON"),
    "config not an object": ("config.json", lambda p: p.write_text("[1, 2]"), "expected a JSON object"),
    "unknown model_type": ("config.json", lambda p: p.write_text(
        json.dumps({**json.loads(p.read_text()), "model_type": "nonesuch"})), "'nonesuch'"),
    "tokenizer empty": ("tokenizer.json", lambda p: p.write_text(""), "empty"),
    "tokenizer garbage": ("tokenizer.json", lambda p: p.write_text("{nope"), "not valid UTF-8 JSON"),
    "tokenizer missing": ("tokenizer.json", lambda p: p.unlink(), "no tokenizer"),
    "tokenizer config garbage": ("tokenizer_config.json", lambda p: p.write_text("nope"), "not valid UTF-8 JSON"),
    "tokenizer a FIFO": ("tokenizer.json", lambda p: (p.unlink(), os.mkfifo(p)), "not a regular file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("tier", ["nano", "plus"])
def test_bad_config_or_tokenizer_files_are_named(tiny, tmp_path, case, tier):
    model = tmp_path / "model"
    shutil.copytree(tiny("qwen3_moe"), model)
    name, damage, words = BAD_FILES[case]
    damage(model / name)
    with pytest.raises(ModelFileError) as error:
        outlier_runtime.load(tier, model=str(model), force=True).close()
    message = str(error.value)
    assert "\n" not in message and words in message
    assert (name in message) or case == "tokenizer missing"
