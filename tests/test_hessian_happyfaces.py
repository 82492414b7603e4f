"""The image-archive loader, the HappyFaces probes and CNN curvature (exact against torch.func.hessian)."""

from __future__ import annotations

import gzip
import io
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.func import functional_call

from steerlab.data.errors import DataFormatError
from steerlab.data.images import LabelledFaces, read_happyfaces, read_image_archive
from steerlab.errors import UserError
from steerlab.hessian import CurvatureOperator, classification_task, select_params
from steerlab.hessian.happyfaces import HappyFacesConfig, make_cnn, probe_sets, run_seed, two_heads


def _jpeg(colour, size=20, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format=fmt)
    return buf.getvalue()


def _archive(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_read_happyfaces_labels_and_pixels(tmp_path):
    path = tmp_path / "faces.tar.gz"
    _archive(
        path,
        {
            "set/FSWH/Bob_0001_FSWH.jpg": _jpeg((255, 0, 0)),
            "set/FHWH/Al_0002_FHWH.jpg.gz": gzip.compress(_jpeg((0, 0, 255))),  # a gzipped JPEG inside
            "set/FHWS/Cy_0001_FHWS.png": _jpeg((0, 255, 0), fmt="PNG"),
            "set/README.txt": b"not an image",
        },
    )
    faces = read_happyfaces(path, size=4)
    assert isinstance(faces, LabelledFaces) and len(faces) == 3
    assert faces.tags == ["FHWH", "FHWS", "FSWH"]  # sorted by member name
    assert faces.face.tolist() == [1, 1, 0] and faces.text.tolist() == [1, 0, 1]
    assert faces.images.shape == (3, 3, 4, 4)
    means = faces.images.mean((2, 3))
    assert torch.allclose(means[1], torch.tensor([0.0, 1.0, 0.0]))  # PNG: lossless
    assert means[0, 2] > 0.95 and means[0, :2].max() < 0.05  # JPEG blue, within compression error
    assert means[2, 0] > 0.95 and means[2, 1:].max() < 0.05


def test_loader_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.tar.gz: no such file"):
        read_image_archive(tmp_path / "missing.tar.gz")
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 definitely not a tar archive")
    with pytest.raises(DataFormatError, match="bad.tar.gz: not a readable tar archive"):
        read_image_archive(bad)
    truncated = tmp_path / "truncated.tar.gz"
    _archive(truncated, {"a/x_0001_FHWH.jpg": _jpeg((1, 2, 3), size=64)})
    truncated.write_bytes(truncated.read_bytes()[:-200])
    with pytest.raises(DataFormatError, match="truncated.tar.gz"):
        read_image_archive(truncated)
    corrupt = tmp_path / "corrupt.tar.gz"
    _archive(
        corrupt, {"a/x_0001_FHWH.jpg": b"\xff\xd8 garbage", "a/y_0001_FHWH.jpg.gz": gzip.compress(_jpeg(0))}
    )
    with pytest.raises(
        DataFormatError, match=r"corrupt.tar.gz: member a/x_0001_FHWH.jpg: not a readable image"
    ):
        read_image_archive(corrupt)
    empty = tmp_path / "empty.tar.gz"
    _archive(empty, {"a/notes.txt": b"hello"})
    with pytest.raises(DataFormatError, match="empty.tar.gz: no image files"):
        read_image_archive(empty)
    untagged = tmp_path / "untagged.tar.gz"
    _archive(untagged, {"a/person_0001.jpg": _jpeg(0)})
    with pytest.raises(
        DataFormatError, match="member a/person_0001.jpg: the file name does not end in a tag"
    ):
        read_happyfaces(untagged)


def _synthetic_faces(n: int = 24, size: int = 16, agree: bool = True, seed: int = 0) -> LabelledFaces:
    """A bright blob (face happy) or dark blob in the top part, a wide or narrow red bar in the band."""
    gen = torch.Generator().manual_seed(seed)
    face = torch.arange(n) % 2
    text = face.clone() if agree else (torch.arange(n) // 2) % 2
    x = 0.3 + 0.1 * torch.rand(n, 3, size, size, generator=gen)
    for i in range(n):
        x[i, :, 4:9, 5:11] = 0.9 if face[i] else 0.1
        x[i, 0, 14:, 3 : (13 if text[i] else 7)] = 1.0
    tags = [f"F{'H' if f else 'S'}W{'H' if t else 'S'}" for f, t in zip(face.tolist(), text.tolist())]
    return LabelledFaces(x, [f"p_{i:04d}_{t}.jpg" for i, t in enumerate(tags)], "synthetic", face, text, tags)


def test_probe_sets_mask_and_swap():
    faces = _synthetic_faces()
    probes = probe_sets(faces, band=0.8, seed=0)  # band rows 12..15
    x = faces.images.double()
    fx, fy = probes["face"]
    assert torch.equal(fx[:, :, :12], x[:, :, :12]) and torch.equal(fy, faces.face)
    assert torch.allclose(fx[:, :, 12:], x.mean(0)[:, 12:].expand_as(fx[:, :, 12:]))  # same band for all
    tx, ty = probes["text"]
    assert torch.equal(tx[:, :, 12:], x[:, :, 12:])
    assert torch.allclose(tx[:, :, :12], x.mean(0)[:, :12].expand_as(tx[:, :, :12]))
    sx, sf, st = probes["swapped"]
    assert torch.equal(sf, faces.face) and torch.equal(st, 1 - faces.face)
    assert torch.equal(sx[:, :, :12], x[:, :, :12])
    wide = sx[:, 0, 14:, 8:13].mean((1, 2)) > 0.9  # the band now carries the other class's writing
    assert torch.equal(wide.long(), st)
    with pytest.raises(ValueError, match="agree"):
        probe_sets(_synthetic_faces(agree=False), 0.8, 0)


def test_cnn_curvature_is_exact():
    """Hessian and GGN products of the CNN (conv weights included) against dense float64 matrices from torch.func."""
    model = make_cnn((3, 4, 4), seed=0)
    faces = _synthetic_faces(n=6, size=8)
    x, y = faces.images.double(), faces.face
    params = select_params(model, include=[r"^6\.", r"^10\."])  # the last conv and the linear
    names = list(params)
    base = dict(model.named_parameters())
    sizes = [base[n].numel() for n in names]

    def unflat(flat):
        return {n: c.view(base[n].shape) for n, c in zip(names, torch.split(flat, sizes))}

    def loss(flat):
        return F.cross_entropy(functional_call(model, {**base, **unflat(flat)}, (x,)), y)

    flat = torch.cat([base[n].detach().reshape(-1) for n in names])
    exact = torch.func.hessian(loss)(flat)
    vs = torch.randn(3, len(flat), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    op = CurvatureOperator(model, classification_task(), [(x[:4], y[:4]), (x[4:], y[4:])], params)
    assert torch.allclose(op.matmat(vs.T), exact @ vs.T, atol=1e-12)
    gop = CurvatureOperator(model, classification_task(), [(x, y)], params, kind="ggn")
    jac = torch.func.jacrev(lambda f: functional_call(model, {**base, **unflat(f)}, (x,)))(flat)
    p = torch.softmax(model(x), -1).detach()
    lh = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("nci,ncd,ndj->ij", jac, lh, jac) / len(y)
    assert torch.allclose(gop.matmat(vs.T), ggn @ vs.T, atol=1e-12)
    assert not torch.allclose(ggn, exact, atol=1e-6)  # the two operators differ here: both checks bite


def test_run_seed_on_synthetic_faces():
    """End to end on tiny synthetic images; the heads are chosen on probe data (the validation set is only read)."""
    cfg = HappyFacesConfig(
        size=16, channels=(3, 4, 4), train_steps=60, k_project=3, n_random=2, t_grid=(0.5, 2.0)
    )
    labeled, val = _synthetic_faces(24, 16, seed=1), _synthetic_faces(24, 16, agree=False, seed=2)
    run = run_seed(cfg, labeled, val)
    assert run["dim"] == sum(p.numel() for p in make_cnn(cfg.channels).parameters())
    for key in ("face_dir_face_change", "text_dir_text_change", "random_max_change", "worst_head_acc"):
        assert -1.0 <= run[key] <= 1.0
    assert run["worst_head_acc"] == min(run["head_validation_acc"].values())
    assert set(run["layer_shares"]["face"]) == set(dict(make_cnn(cfg.channels).named_parameters()))
    assert np.isclose(sum(run["layer_shares"]["text"].values()), 1.0)
    assert all(0 <= a <= 90.0 + 1e-9 for a in run["principal_angles_face_vs_text_deg"])


def test_two_heads_pick_the_unperturbed_model_when_nothing_helps():
    model = make_cnn((2, 2, 2), seed=0)
    params = select_params(model)
    probes = probe_sets(_synthetic_faces(8, 8), 0.8, 0)
    zero = torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64)
    heads = two_heads(model, params, {"face": zero, "text": zero}, probes, (1.0, 2.0))
    assert heads == {"face": ("text", 0.0, 1.0), "text": ("face", 0.0, 1.0)}


@pytest.mark.slow
def test_real_happyfaces_archives(shared_data):
    folder = shared_data / "happyfaces"
    if not (folder / "validation_sets.tar.gz").is_file():
        pytest.skip(f"HappyFaces archives not found in {folder}")
    val = read_happyfaces(folder / "validation_sets.tar.gz", size=8)
    assert len(val) == 200 and sorted(set(val.tags)) == ["FHWH", "FHWS", "FSWH", "FSWS"]
    assert (
        int(val.face.sum()) == 100 and int(val.text.sum()) == 100 and int((val.face != val.text).sum()) == 100
    )
