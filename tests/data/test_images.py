import numpy as np
import pytest
import torch
from PIL import Image

from essa import data
from essa.data import images
from essa.data.transforms import IMAGENET_MEAN, IMAGENET_STD

from .conftest import write_image


def rgb_pixels(path, **options) -> np.ndarray:
    source = data.open_source(path, **options)
    return np.asarray(source.load(source.records[0]))


def test_grey_is_copied_into_three_channels(tmp_path):
    pixels = rgb_pixels(write_image(tmp_path / "g.png", 77))
    assert pixels.shape == (8, 8, 3) and (pixels == 77).all()


def test_16_bit_png_is_scaled_by_its_own_min_and_max(tmp_path):
    values = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    path = write_image(tmp_path / "wide.png", values)
    assert Image.open(path).mode.startswith("I")  # really stored as 16 bits
    assert rgb_pixels(path)[:, :, 0].tolist() == [[0, 64], [128, 255]]


def test_float_image_is_scaled_like_16_bit():
    image = Image.fromarray(np.array([[-1.0, 0.0], [0.5, 1.0]], dtype=np.float32))
    assert np.asarray(images.to_rgb(image))[:, :, 1].tolist() == [[0, 128], [191, 255]]


def test_palette_image_takes_its_palette_colours(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert rgb_pixels(tmp_path / "p.png")[0, 0].tolist() == [200, 10, 30]


def test_alpha_channel_is_dropped(tmp_path):
    pixels = rgb_pixels(write_image(tmp_path / "a.png", (10, 20, 30, 0), mode="RGBA"))
    assert pixels[0, 0].tolist() == [10, 20, 30]


def test_window_maps_centre_minus_half_width_to_0_and_plus_half_width_to_255():
    lo, hi = images.intensity_range(np.zeros(1), window=(40, 400))
    assert (lo, hi) == (-160, 240)
    assert images.to_uint8(np.array([-1000, -160, 40, 240, 3000]), lo, hi).tolist() == [0, 0, 128, 255, 255]


def test_percentiles_and_constant_images():
    values = np.arange(101, dtype=np.float32)
    assert images.intensity_range(values, percentiles=(10, 90)) == (10, 90)
    assert images.to_uint8(np.full((2, 2), 7.0), 7, 7).tolist() == [[0, 0], [0, 0]]


def test_non_positive_window_width_is_an_error():
    with pytest.raises(data.DataError, match="window width must be positive, got centre=40 width=0"):
        images.intensity_range(np.zeros(1), window=(40, 0))


def test_eval_tensor_is_imagenet_normalised(tmp_path):
    write_image(tmp_path / "a" / "x.png", 128, size=(40, 20))
    write_image(tmp_path / "b" / "y.png", 255, size=(20, 20))
    dataset = data.ImageDataset(data.open_source(tmp_path), transform=data.transforms.eval_transform(16))
    tensor, label = dataset[0]
    assert tensor.shape == (3, 16, 16) and label == 0
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(tensor[:, 8, 8], expected)
    assert data.transforms.train_transform(16)(Image.new("RGB", (40, 20))).shape == (3, 16, 16)


def test_dataset_stats_of_constant_images(tmp_path):
    write_image(tmp_path / "a" / "x.png", (51, 102, 204), mode="RGB")
    write_image(tmp_path / "b" / "y.png", (51, 102, 204), mode="RGB")
    mean, std = data.dataset.dataset_stats(data.open_source(tmp_path), img_size=8)
    assert mean == pytest.approx((0.2, 0.4, 0.8), abs=1e-6)
    assert std == pytest.approx((0, 0, 0), abs=1e-3)
