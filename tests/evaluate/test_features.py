"""Features and class probabilities of real images in eval mode, rows that match their records, and the disk cache."""

import pytest
import torch

from essa import data
from essa.evaluate.features import cached_cls_features, classifier_scores, cls_features, probabilities
from tests.conftest import SHARED

BREAST = SHARED / "data" / "medmnist" / "breastmnist.npz"
pytestmark = pytest.mark.skipif(not BREAST.is_file(), reason=f"shared BreastMNIST not found at {BREAST}")


@pytest.fixture(scope="module")
def breast():
    source = data.open_source(BREAST)
    return source, [r for r in source.records if r.split == "test"][:6]


def _eval_view(source, records, model, size=32):
    """The eval view of ``records`` with ``model``'s own preprocessing (vit_tiny_patch16_224's: 0.5 / 0.5, bicubic)."""
    view = data.transforms.eval_transform(size, preprocessing=data.normalize.of_model(model))
    dataset = data.ImageDataset(source, records, view)
    return torch.stack([dataset[i][0] for i in range(len(records))])


def test_cls_features_are_the_eval_mode_cls_token_and_the_mode_is_restored(make_vit, breast):
    source, records = breast
    model = make_vit(drop_path_rate=0.5).train()  # drop-path would make train-mode features random
    out = cls_features(model, source, records, img_size=32, batch_size=4)
    assert model.training
    with torch.no_grad():
        expected = model.eval().forward_features(_eval_view(source, records, model))[:, 0]
    assert out.values.shape == (6, 192) and torch.allclose(out.values, expected, atol=1e-5)
    assert out.labels.tolist() == [r.label for r in records] and out.records == records


def test_unreadable_images_are_left_out_with_their_rows(make_vit, breast, tmp_path):
    source, _ = breast
    for label in (0, 1):  # two real images per class as files, and a file in class 0 that is not an image
        (tmp_path / f"class{label}").mkdir()
        for i, record in enumerate([r for r in source.records if r.label == label][:2]):
            source.read(record).save(tmp_path / f"class{label}" / f"{i}.png")
    (tmp_path / "class0" / "9.png").write_bytes(b"not a png")
    images = data.open_source(tmp_path)
    model = make_vit().eval()
    with pytest.warns(UserWarning, match="skipped unreadable image .*9.png"):
        out = cls_features(model, images, img_size=32)
    readable = [r for r in images.records if not r.path.endswith("9.png")]
    assert out.records == readable and len(out.values) == len(out.labels) == 4
    alone = cls_features(model, images, readable, img_size=32)
    assert torch.allclose(out.values, alone.values, atol=1e-5) and torch.equal(out.labels, alone.labels)


class _Refuses(torch.nn.Module):
    """A stand-in backbone that fails if it is asked for features."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward_features(self, x):
        raise AssertionError("the features should have come from the cache")


def test_cached_features_are_read_back_only_for_the_same_backbone_and_images(make_vit, breast, tmp_path):
    source, records = breast
    path = tmp_path / "features" / "test.safetensors"
    vit = make_vit().eval()
    own = data.normalize.of_model(vit)  # the stand-in has no preprocessing of its own: give it the ViT's
    first = cached_cls_features(vit, source, records, path, {"name": "tiny"}, img_size=32)
    again = cached_cls_features(_Refuses(), source, records, path, {"name": "tiny"}, img_size=32, preprocessing=own)
    assert torch.equal(first.values, again.values) and torch.equal(first.labels, again.labels)
    assert again.records == records
    imagenet = data.normalize.resolve("imagenet", own)
    for identity, subset, size, pre in (({"name": "other"}, records, 32, own),
                                        ({"name": "tiny"}, records[:3], 32, own),
                                        ({"name": "tiny"}, records, 16, own),
                                        ({"name": "tiny"}, records, 32, imagenet)):  # another normalisation
        with pytest.raises(AssertionError, match="should have come from the cache"):
            cached_cls_features(_Refuses(), source, subset, path, identity, img_size=size, preprocessing=pre)


def test_classifier_scores_are_probabilities(make_vit, breast):
    source, records = breast
    model = make_vit(num_classes=2).eval()
    out = classifier_scores(model, source, records, task="binary", img_size=32)
    with torch.no_grad():
        assert torch.allclose(out.values, model(_eval_view(source, records, model)).softmax(1), atol=1e-6)
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    assert torch.allclose(probabilities(logits, "multilabel"), torch.sigmoid(logits))
    assert torch.isclose(probabilities(logits, "ordinal").sum(), torch.tensor(1.0))
