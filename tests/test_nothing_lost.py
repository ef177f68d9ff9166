"""Nothing lost, nothing silent: outputs never replace inputs or user data, resumable rows
never mix, every weights file a run is read from is hashed, one writer per folder, and the
user's environment (full disk, read-only folder) is exit 2 with the remedy.

Each test here failed on the code before these guarantees (see the CHANGELOG entry).
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from trainkit import model_config

from qlab.cli import main
from qlab.config import get_preset
from qlab.errors import CheckpointError, ConfigError
from qlab.io.checkpoint import resume_state, save_checkpoint
from qlab.io.outputs import STAMP_NAME, claim_output_dir, output_lock
from qlab.train.config import TrainConfig


def _docs(folder: Path) -> Path:
    folder.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
    for i in range(24):
        (folder / f"d{i}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(400)))
    return folder


def _small_model():
    from qlab.model.gpt import GPT

    torch.manual_seed(0)
    return GPT(model_config(64, loop=False))


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    model = _small_model()
    out = tmp_path / "run"
    save_checkpoint(out, model, None, SimpleNamespace(state_dict=dict), {"step": 0, "tokens_seen": 0},
                    model.config, TrainConfig())  # fmt: skip
    return out


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. datasets are not rebuilt over


def test_data_build_refuses_a_folder_holding_a_dataset(tmp_path, capsys):
    src = _docs(tmp_path / "src")
    out = tmp_path / "ds"
    assert (
        main(["data", "build", str(src), "--out", str(out), "--vocab", "300", "--shard-tokens", "4000"]) == 0
    )
    before = _tree(out)
    assert main(["data", "build", str(src), "--out", str(out), "--vocab", "320"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert _tree(out) == before  # shards, meta.json and tokenizer untouched
    assert main(["data", "build", str(src), "--out", str(out), "--vocab", "320", "--force"]) == 0
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 320


def test_data_build_never_writes_into_its_source(tmp_path, capsys, tiny_dataset):
    src = _docs(tmp_path / "src")
    assert main(["data", "build", str(src), "--out", str(src / "ds"), "--vocab", "300"]) == 2
    assert "write into the input" in capsys.readouterr().err
    out = tmp_path / "ds"
    out.mkdir()
    tok = out / "tokenizer.model"  # the dataset's own tokenizer: rebuilt with the same bytes
    tok.write_bytes(Path(tiny_dataset.tokenizer_path).read_bytes())
    (out / "meta.json").write_text('{"shards": {}}')
    assert main(["data", "build", str(src), "--out", str(out), "--tokenizer", str(tok), "--force"]) == 0
    assert tok.read_bytes() == Path(tiny_dataset.tokenizer_path).read_bytes()


def test_force_never_replaces_an_input_inside_the_output(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "policy.json").write_text("{}")
    (out / "old.csv").write_text("x")
    with pytest.raises(ConfigError, match="never replaces an input"):
        claim_output_dir(out, "sweep", [out / "policy.json"], force=True)


def test_a_foreign_non_empty_folder_needs_force(tmp_path, capsys):
    src = _docs(tmp_path / "src")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert main(["data", "build", str(src), "--out", str(out), "--vocab", "300"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "my notes"


# ------------------------------------------------------------------ 2. fingerprint tables


def test_fingerprint_never_writes_into_a_dataset_folder(tmp_path, tiny_dataset, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset.root, data)
    w = tmp_path / "w.safetensors"
    save_file({"blocks.0.mlp.fc.weight": torch.randn(64, 32)}, str(w))
    before = _tree(data)
    for force in ([], ["--force"]):
        argv = [
            "fingerprint",
            str(w),
            "--data",
            "none",
            "--policy",
            "none",
            "--no-figures",
            "--out",
            str(data),
        ]
        assert main(argv + force) == 2
        assert "holds a dataset" in capsys.readouterr().err
    assert _tree(data) == before


def test_fingerprint_reruns_into_its_own_folder_but_not_a_foreign_one(tmp_path, capsys):
    w = tmp_path / "w.safetensors"
    save_file({"blocks.0.mlp.fc.weight": torch.randn(64, 32)}, str(w))
    argv = ["fingerprint", str(w), "--data", "none", "--policy", "none", "--no-figures"]
    out = tmp_path / "fp"
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads((out / STAMP_NAME).read_text())["command"] == "fingerprint"
    assert main([*argv, "--out", str(out)]) == 0  # a previous output of the same command
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text('{"mine": true}')
    assert main([*argv, "--out", str(other)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert json.loads((other / "meta.json").read_text()) == {"mine": True}


# ------------------------------------------------------------------ 3. resumable rows never mix


def test_marginal_refuses_rows_of_another_checkpoint(tmp_path, run_dir, tiny_dataset, capsys):
    out = tmp_path / "marg"
    out.mkdir()
    (out / "marginal.csv").write_text("rows of another run\n")
    stamp = {"command": "marginal", "provenance": {"checkpoint": "0" * 64, "policy": {}, "codec": "ans"}}
    (out / STAMP_NAME).write_text(json.dumps(stamp))
    argv = ["marginal", str(run_dir), "--data", str(tiny_dataset.root), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "another" in err and "checkpoint" in err and "--force" in err
    assert (out / "marginal.csv").read_text() == "rows of another run\n"


def test_marginal_rows_of_another_base_are_refused_by_the_library(tmp_path):
    from qlab.analysis.marginal import COLUMNS, _read_rows

    path = tmp_path / "marginal.csv"
    row = dict.fromkeys(COLUMNS, 1) | {"group": "mlp_in", "setting": "bits+1", "base_bytes": 5000}
    path.write_text(",".join(COLUMNS) + "\n" + ",".join(str(row[c]) for c in COLUMNS) + "\n")
    assert _read_rows(path, 5000)
    with pytest.raises(ConfigError, match="another checkpoint, policy or codec"):
        _read_rows(path, 6000)


@pytest.mark.parametrize(
    "text",
    ["group,setting\n", "\x00\x01\x02\xff\xfe", "", ",".join(["group"] * 13) + "\n1,2\n"],
)
def test_a_hostile_marginal_table_is_a_qlab_error(tmp_path, text):
    from qlab.analysis.marginal import _read_rows

    path = tmp_path / "marginal.csv"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError):
        _read_rows(path, 100)


def test_provenance_mismatch_with_force_starts_afresh(tmp_path):
    out = tmp_path / "o"
    assert claim_output_dir(out, "marginal", provenance={"checkpoint": "a"}) is True
    assert claim_output_dir(out, "marginal", provenance={"checkpoint": "a"}) is True
    (out / "marginal.csv").write_text("x")
    with pytest.raises(ConfigError, match="another checkpoint"):
        claim_output_dir(out, "marginal", provenance={"checkpoint": "b"})
    assert claim_output_dir(out, "marginal", force=True, provenance={"checkpoint": "b"}) is False
    tupled = tmp_path / "t"  # a provenance holding tuples matches its own JSON stamp on a rerun
    for _ in range(2):
        assert claim_output_dir(tupled, "marginal", provenance={"policy": {"k": (1, 2.5)}}) is True


# ------------------------------------------------------------------ 4. --force never makes an input writable


def test_quantize_never_writes_over_its_policy_file(tmp_path, run_dir, capsys):
    pol = tmp_path / "p.json"
    pol.write_text(json.dumps({"name": "p", "rules": []}))
    before = pol.read_bytes()
    argv = [
        "quantize",
        str(run_dir),
        "--policy",
        str(pol),
        "--out",
        str(pol),
        "--force",
        "--calib-batches",
        "0",
    ]
    assert main(argv) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert pol.read_bytes() == before


def test_entropy_never_writes_into_its_calibration_data(tmp_path, tiny_dataset, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset.root, data)
    w = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(w))
    before = (data / "meta.json").read_bytes()
    argv = ["entropy", str(w), "--calib-data", str(data), "--json", str(data / "meta.json"), "--force"]
    assert main(argv) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert (data / "meta.json").read_bytes() == before


# ------------------------------------------------------------------ 5. every run weights file is hashed


@pytest.mark.parametrize("command", ["entropy", "fingerprint", "sweep", "load"])
def test_a_bit_flipped_run_is_refused_by_every_reader(run_dir, tmp_path, capsys, command):
    import qlab

    _flip_last_byte(run_dir / "model.safetensors")
    if command == "load":
        with pytest.raises(CheckpointError, match="SHA-256"):
            qlab.load(run_dir)
        return
    argv = {
        "entropy": ["entropy", str(run_dir)],
        "fingerprint": [
            "fingerprint",
            str(run_dir),
            "--data",
            "none",
            "--no-figures",
            "--out",
            str(tmp_path / "f"),
        ],
        "sweep": ["sweep", str(run_dir), "--bits", "6", "--k", "12", "--out", str(tmp_path / "s")],
    }[command]
    assert main([*argv, "--no-progress"]) == 2
    assert "SHA-256" in capsys.readouterr().err


def test_resume_state_is_hashed(run_dir):
    assert resume_state(run_dir)["step"] == 0
    _flip_last_byte(run_dir / "optimizer.pt")
    with pytest.raises(CheckpointError, match="state_sha256"):
        resume_state(run_dir)


# ------------------------------------------------------------------ 6. one writer per folder


def test_a_second_train_on_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from qlab.io.outputs import output_lock
            with output_lock({str(out)!r}):
                print("locked", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main(["train", "--out", str(out), "--iterations", "1", "--no-progress"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out):  # the kernel released the killed holder's lock
        pass


def test_quantize_and_marginal_take_the_lock(tmp_path, run_dir, tiny_dataset, capsys):
    with output_lock(tmp_path, name=".model.qlab.lock"):
        argv = ["quantize", str(run_dir), "--out", str(tmp_path / "model.qlab"), "--calib-batches", "0"]
        assert main(argv) == 2
        assert "another qlab process" in capsys.readouterr().err
    out = tmp_path / "marg"
    with output_lock(out):
        argv = ["marginal", str(run_dir), "--data", str(tiny_dataset.root), "--out", str(out)]
        assert main(argv) == 2
        assert "another qlab process" in capsys.readouterr().err


def test_matrix_cells_take_a_lock_each_and_grids_do_not_mix(tmp_path):
    from qlab.analysis.matrix.runner import CELLS_DIR, _claim, run_cell
    from qlab.analysis.matrix.spec import plan_cells, spec_from_dict

    spec = spec_from_dict(
        {"name": "m", "seeds": [0], "bases": {"a": {"preset": "tiny"}}, "variants": ["control"]}
    )
    out = tmp_path / "grid"
    _claim(out, spec)
    _claim(out, spec)  # a second shard of the same grid
    other = spec_from_dict({"name": "m", "seeds": [0, 1], "bases": {"a": {"preset": "tiny"}}})
    with pytest.raises(ConfigError, match="another grid spec"):
        _claim(out, other)
    cell = plan_cells(spec)[0]
    with output_lock(out / CELLS_DIR, name=f".{cell.cell_id}.lock"), pytest.raises(ConfigError, match="pid"):
        run_cell(spec, cell, out)


# ------------------------------------------------------------------ 7. nothing silently defaulted


def test_a_spec_cut_at_a_table_boundary_is_refused(tmp_path):
    from qlab.analysis.matrix.spec import load_spec

    path = tmp_path / "m.toml"
    path.write_text('name = "m"\nseeds = [0]\n[bases.a]\npreset = "tiny"\n[eval]\n')
    with pytest.raises(ConfigError, match="eval is an empty table"):
        load_spec(path)
    path.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_spec(path)


@pytest.mark.parametrize("flag", ["--seq-len", "--eval-tokens"])
def test_quantize_refuses_a_zero_length(tmp_path, run_dir, capsys, flag):
    assert main(["quantize", str(run_dir), "--out", str(tmp_path / "m.qlab"), flag, "0"]) == 2
    assert f"{flag} must be ≥ 1" in capsys.readouterr().err


# ------------------------------------------------------------------ 12. the environment is not a bug


@pytest.mark.parametrize(
    "code, remedy",
    [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")],
)
def test_a_failed_write_is_exit_2_with_the_remedy_and_keeps_the_old_file(
    tmp_path, monkeypatch, capsys, code, remedy
):
    import os

    import qlab.io.atomic as atomic

    w = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(w))
    out = tmp_path / "r.json"
    out.write_text("the previous report")

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    assert main(["entropy", str(w), "--json", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert remedy in err and str(out) in err and "internal error" not in err
    assert out.read_text() == "the previous report"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_allocation_failure_is_exit_2(monkeypatch, capsys):
    import qlab.cli.info as info

    def alloc(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(info, "run", alloc)
    from qlab.cli import build_parser

    args = build_parser().parse_args(["info", "--list"])
    args.func = alloc
    monkeypatch.setattr("qlab.cli.build_parser", lambda only=None: SimpleNamespace(parse_args=lambda a: args))
    assert main(["info", "--list"]) == 2
    assert "out of memory" in capsys.readouterr().err


def test_models_too_large_for_this_machine_are_refused_before_allocation(monkeypatch):
    import qlab.io.memory as memory
    from qlab.model.gpt import GPT

    monkeypatch.setattr(memory, "available_bytes", lambda: 100_000_000)
    cfg = get_preset("tiny").replace(model_dim=1024, num_layers=8, num_heads=8, num_kv_heads=4)
    with pytest.raises(ConfigError, match="more than the 0.1 GB of memory available"):
        GPT(cfg)


# ------------------------------------------------------------------ 14. notebooks, temp files, messages


def _notebook(path: Path, cells: list[tuple[str, str]]) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    for tag, src in cells:
        cell = nbformat.v4.new_code_cell(src)
        if tag:
            cell.metadata["tags"] = [tag]
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def test_a_failing_notebook_is_one_line_and_keeps_what_ran(tmp_path, monkeypatch, capsys):
    nb = _notebook(tmp_path / "n.ipynb", [("parameters", "checkpoint = None"), ("", "print(checkpoint)"),
                                           ("", "raise ValueError('no such table')")])  # fmt: skip
    monkeypatch.chdir(tmp_path)
    w = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2)}, str(w))
    out = tmp_path / "out"
    assert main(["figures", "--notebook", str(nb), "--checkpoint", "w.safetensors", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "\x1b[" not in err
    assert "cell 2 failed: ValueError: no such table" in err
    ran = json.loads((out / "n.ipynb").read_text())
    assert str(w) in "".join(ran["cells"][1]["outputs"][0]["text"])  # resolved against the caller's cwd


def test_a_missing_notebook_checkpoint_is_refused_before_the_kernel_starts(tmp_path, capsys):
    nb = _notebook(tmp_path / "n.ipynb", [("parameters", "checkpoint = None")])
    assert (
        main(["figures", "--notebook", str(nb), "--checkpoint", "nowhere/ckpt", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err


def test_temp_files_of_a_dead_writer_are_swept_at_once(tmp_path):
    import qlab.io.atomic as atomic

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    orphan = tmp_path / f".table.csv.{atomic._HOST}-{pid}.abcd1234.tmp"
    foreign = tmp_path / f".table.csv.00000000-{pid}.abcd1234.tmp"  # another host's: only the age rule
    live = tmp_path / f".table.csv.{atomic._HOST}-{holder_pid()}.abcd1234.tmp"
    for p in (orphan, foreign, live):
        p.write_bytes(b"partial")
    atomic.atomic_write_bytes(tmp_path / "table.csv", b"a,b\n")
    assert not orphan.exists() and foreign.exists() and live.exists()


def holder_pid() -> int:
    return 1  # init: always alive


def test_artifact_errors_name_the_path_once(tmp_path, capsys):
    from qlab.compress.container import encode_artifact

    path = tmp_path / "bad.qlab"
    data = bytearray(encode_artifact({"w": torch.randn(8, 8)}, codec="brotli-11"))
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    for argv in (["entropy", str(path)], ["eval", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count(str(path)) == 1, err


def test_an_unpicklable_ptz_is_one_line(tmp_path, capsys):
    import io
    import os

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    buf = io.BytesIO()
    torch.save({"w": Evil()}, buf)
    path = tmp_path / "evil.ptz"
    path.write_bytes(buf.getvalue())
    assert main(["entropy", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "weights_only=False" not in err


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_real_full_disk_and_a_read_only_folder(small_disk, tmp_path, capsys):
    src = _docs(tmp_path / "src")
    out = small_disk / "ds"
    assert (
        main(["data", "build", str(src), "--out", str(out), "--vocab", "300", "--shard-tokens", "2000"]) == 2
    )
    err = capsys.readouterr().err
    assert "no space left" in err and str(out) in err and "internal error" not in err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    w = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(8, 8)}, str(w))
    assert main(["entropy", str(w), "--json", str(small_disk / "r.json")]) == 2
    assert "read-only file system" in capsys.readouterr().err
