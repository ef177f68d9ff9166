from __future__ import annotations

import json

import pytest

from qlab.cli import main
from qlab.data import fineweb


def test_cli_build_and_info(tmp_path, tiny_dataset, capsys):
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps({"text": f"Line {i} of a small jsonl corpus for the cli."}) for i in range(40)]
    (src / "a.jsonl").write_text("\n".join(lines))
    out = tmp_path / "out"
    assert (
        main(["data", "build", str(src), "--tokenizer", str(tiny_dataset.tokenizer_path), "--out", str(out)])
        == 0
    )
    assert (out / "meta.json").is_file()
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "vocab_size: 512" in text and "train_000000.bin" in text and "val_000000.bin" in text


def test_cli_build_trains_tokenizer(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"{i}.txt").write_text(
            f"Plain text document {i}.\nIt has two lines and digits {i * 37}.\n" * 5
        )
    assert main(["data", "build", str(src), "--vocab", "300", "--out", str(tmp_path / "o")]) == 0
    assert "vocab_size: 300" in capsys.readouterr().out


def test_cli_embedded(tmp_path, capsys):
    assert main(["data", "embedded", "--out", str(tmp_path / "e"), "--vocab", "512"]) == 0
    out = capsys.readouterr().out
    assert "source:     embedded" in out and "vocab_size: 512" in out


def test_cli_fineweb_with_fake_fetch(tmp_path, tokenizer_1024, monkeypatch, capsys):
    from qlab.data.shards import write_shard

    hub = tmp_path / "hub"
    write_shard(hub / "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin", list(range(20)))
    write_shard(hub / "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin", list(range(20)))
    (hub / "datasets/tokenizers").mkdir(parents=True)
    (hub / "datasets/tokenizers/fineweb_1024_bpe.model").write_bytes(tokenizer_1024.read_bytes())
    (hub / "datasets/manifest.json").write_text('{"datasets": [{"name": "fineweb10B_sp1024"}]}')
    seen = []
    monkeypatch.setattr(
        fineweb, "_hub_fetch", lambda repo_id, staging: seen.append(repo_id) or (lambda r: hub / r)
    )
    args = ["data", "fineweb", "--variant", "sp1024", "--train-shards", "1", "--out", str(tmp_path / "fw")]
    assert main(args) == 0
    assert "fineweb_train_000000.bin" in capsys.readouterr().out
    assert main([*args[:-2], "--out", str(tmp_path / "fw2"), "--repo", "me/mine"]) == 0
    assert seen == ["willdepueoai/parameter-golf", "me/mine"]


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "build", str(tmp_path), "--out", str(tmp_path / "o")])  # needs --tokenizer or --vocab
