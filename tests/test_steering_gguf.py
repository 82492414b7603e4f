"""llama.cpp control vectors (GGUF): round trip, the layer convention, repeng's files, bad files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import tiny_model
from steerlab.hooks import Positions
from steerlab.steering import InvalidVectorError, LayerChoiceError, SteeringVector, VectorError
from steerlab.steering.gguf import ControlVectorFileError, export_control_vector, import_control_vector


def _vector(layers=(1, 3), width: int = 32, seed: int = 0, **metadata) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    vectors = {layer: torch.randn(width, generator=generator) for layer in layers}
    return SteeringVector(vectors, metadata)


def _write_like_repeng(path: Path, directions: dict[int, np.ndarray], model_hint: str = "llama") -> None:
    """The file repeng 0.4.0's `ControlVector.export_gguf` writes, with the same gguf calls."""
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer in directions:
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_round_trip_gives_identical_tensors_and_layers(tmp_path):
    vector = _vector(layers=(1, 3, 7))
    path = export_control_vector(vector, tmp_path / "v.gguf", model_hint="llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gguf"]  # no temporary file left
    loaded = import_control_vector(path)
    assert loaded.layers == [1, 3, 7]
    for layer in vector.layers:
        assert loaded.vectors[layer].dtype == torch.float32
        assert torch.equal(loaded.vectors[layer], vector.vectors[layer])
    source = loaded.metadata["source"]
    assert source["file"] == str(path)
    assert source["model_hint"] == "llama"
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.metadata["method"] == "imported"
    assert loaded.residual_norm(3) is None
    with pytest.raises(VectorError, match="pass an explicit multiplier"):
        loaded.multiplier_for_fraction(3, 0.1)
    # exporting the imported vector again gives the same file (the hint is kept)
    again = export_control_vector(loaded, tmp_path / "again.gguf")
    assert again.read_bytes() == path.read_bytes()


def test_steerlab_layer_n_is_direction_n(tmp_path):
    vector = _vector(layers=(2, 3), model={"model_type": "qwen2", "num_layers": 4, "hidden_size": 32})
    path = export_control_vector(vector, tmp_path / "v.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "qwen2"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.2", "direction.3"]
    for layer in (2, 3):
        assert tensors[f"direction.{layer}"].dtype == np.float32
        np.testing.assert_array_equal(tensors[f"direction.{layer}"], vector.vectors[layer].numpy())


def test_negative_layers_and_layer_choice(tmp_path):
    model = {"num_layers": 4, "hidden_size": 32}
    path = export_control_vector(_vector(layers=(-1,), model=model), tmp_path / "neg.gguf")
    assert [t.name for t in gguf.GGUFReader(path).tensors] == ["direction.3"]
    with pytest.raises(LayerChoiceError, match="does not record how many layers"):
        export_control_vector(_vector(layers=(-1,)), tmp_path / "x.gguf")
    with pytest.raises(LayerChoiceError, match=r"layer 0: llama.cpp .* direction.0"):
        export_control_vector(_vector(layers=(0, 2)), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    subset = export_control_vector(_vector(layers=(0, 2)), tmp_path / "subset.gguf", layers=[2])
    assert [t.name for t in gguf.GGUFReader(subset).tensors] == ["direction.2"]


def test_a_file_in_repengs_layout_loads(tmp_path):
    directions = {5: np.arange(1, 9, dtype=np.float32), 2: -np.ones(8, dtype=np.float32)}
    _write_like_repeng(tmp_path / "r.gguf", directions, model_hint="mistral")
    vector = import_control_vector(tmp_path / "r.gguf")
    assert vector.layers == [2, 5]
    for layer, direction in directions.items():
        assert torch.equal(vector.vectors[layer], torch.from_numpy(direction))
    assert vector.metadata["source"]["model_hint"] == "mistral"
    assert vector.norm(5) == pytest.approx(float(np.linalg.norm(directions[5])))


def test_repengs_own_exporter_and_importer(repeng_extract, tmp_path):
    repeng = repeng_extract
    generator = np.random.default_rng(0)
    directions = {layer: generator.standard_normal(16).astype(np.float32) for layer in (6, 1, 3)}
    repeng.ControlVector("llama", directions).export_gguf(str(tmp_path / "repeng.gguf"))
    vector = import_control_vector(tmp_path / "repeng.gguf")
    assert vector.layers == [1, 3, 6]
    for layer, direction in directions.items():
        np.testing.assert_array_equal(vector.vectors[layer].numpy(), direction)
    # and repeng reads what steerlab writes
    export_control_vector(vector, tmp_path / "steerlab.gguf")
    back = repeng.ControlVector.import_gguf(str(tmp_path / "steerlab.gguf"))
    assert back.model_type == "llama"
    assert sorted(back.directions) == [1, 3, 6]
    for layer, direction in directions.items():
        np.testing.assert_array_equal(back.directions[layer], direction)


def test_repeng_and_steerlab_steer_the_same_block(repeng_extract, tmp_path):
    """repeng adds direction N to the output of block N (like llama.cpp); steerlab's layer N is the same."""
    repeng = repeng_extract
    from repeng.control import ControlModel

    model = tiny_model("llama")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _write_like_repeng(tmp_path / "v.gguf", {2: direction.float().numpy()})
    vector = import_control_vector(tmp_path / "v.gguf")
    coeff = 2.0  # a power of two: repeng scales in float32, steerlab in float64; both exact
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        steered = {}
        for layer in (1, 2, 3):
            with SteeringVector({layer: vector.vectors[2]}).apply(
                model, multiplier=coeff, positions=Positions.all(include_sink=True)
            ):
                steered[layer] = model(input_ids=ids).logits
        wrapped = ControlModel(model, [2])
        try:
            wrapped.set_control(repeng.ControlVector.import_gguf(str(tmp_path / "v.gguf")), coeff)
            by_repeng = wrapped(input_ids=ids).logits
        finally:
            wrapped.unwrap()
    assert not torch.allclose(by_repeng, plain)
    torch.testing.assert_close(by_repeng, steered[2], rtol=0, atol=1e-12)
    assert not torch.allclose(by_repeng, steered[1])
    assert not torch.allclose(by_repeng, steered[3])


def _gguf(path: Path, arch: str = "controlvector", tensors: dict | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for name, data in (tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


ONES = np.ones(8, dtype=np.float32)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda p: p, ControlVectorFileError, "no such file"),
        (lambda p: p.write_text("not a gguf file") and p, ControlVectorFileError, "not a readable GGUF file"),
        (lambda p: _gguf(p, "llama", {"direction.1": ONES}), ControlVectorFileError, "architecture 'llama'"),
        (lambda p: _gguf(p), ControlVectorFileError, "holds no direction tensors"),
        (lambda p: _gguf(p, tensors={"bias.1": ONES}), ControlVectorFileError, "unexpected tensor 'bias.1'"),
        (lambda p: _gguf(p, tensors={"direction.x": ONES}), ControlVectorFileError, "'direction.x'"),
        (lambda p: _gguf(p, tensors={"direction.-1": ONES}), ControlVectorFileError, "'direction.-1'"),
        (
            lambda p: _gguf(p, tensors={"direction.1": np.ones((2, 4), np.float32)}),
            ControlVectorFileError,
            r"'direction.1' is F32 with shape \[2, 4\]; a direction is a 1-D float tensor",
        ),
        (
            lambda p: _gguf(p, tensors={"direction.1": np.zeros(8, np.float32)}),
            InvalidVectorError,
            "layer 1: the vector is all zeros",
        ),
        (
            lambda p: _gguf(p, tensors={"direction.1": ONES, "direction.2": np.ones(4, np.float32)}),
            InvalidVectorError,
            "different widths",
        ),
    ],
)
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, make, error, message):
    path = tmp_path / "bad.gguf"
    make(path)
    with pytest.raises(error, match=message) as caught:
        import_control_vector(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "\n" not in str(caught.value)


def test_a_truncated_file_is_named(tmp_path):
    path = export_control_vector(_vector(layers=(1, 2, 3), width=64), tmp_path / "v.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ControlVectorFileError, match="not a readable GGUF file") as caught:
        import_control_vector(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_cli_export_and_import(tmp_path, capsys):
    from steerlab.cli import main

    vector = _vector(layers=(0, 2, 3), model={"model_type": "llama", "num_layers": 4, "hidden_size": 32})
    vector.save(tmp_path / "vec")
    out = tmp_path / "vec.gguf"
    assert main(["vector", "export-gguf", "--vector", str(tmp_path / "vec"), "--out", str(out)]) == 2
    assert "layer 0: llama.cpp applies no control vector" in capsys.readouterr().err
    assert not out.exists()
    argv = ["vector", "export-gguf", "--vector", str(tmp_path / "vec"), "--layers", "2,-1", "--out", str(out)]
    assert main(argv) == 0
    assert "direction.N for layers [2, 3]" in capsys.readouterr().out
    assert main(["vector", "import-gguf", "--gguf", str(out), "--out", str(tmp_path / "back")]) == 0
    back = SteeringVector.load(tmp_path / "back")
    assert back.layers == [2, 3]
    for layer in (2, 3):
        assert torch.equal(back.vectors[layer], vector.vectors[layer])
    assert back.metadata["source"]["model_hint"] == "llama"

    assert (
        main(["vector", "import-gguf", "--gguf", str(tmp_path / "vec.json"), "--out", str(tmp_path / "x")])
        == 2
    )
    assert capsys.readouterr().err.startswith(
        f"steerlab: error: --gguf: {tmp_path / 'vec.json'}: not a readable"
    )
    assert main(["vector", "export-gguf", "--vector", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "--vector: " in capsys.readouterr().err
