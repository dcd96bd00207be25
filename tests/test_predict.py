"""serving/predict.py: the top-5 classes of one's own PNG and JPEG images, of any size."""
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg, write_png

from model import build_model
from serving.predict import ImageError, format_predictions, predict_files, read_image
from serving.trained_net import NormalizedNet

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; until serving/predict.py moves,
# the warning would only repeat itself once per decoded file here.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def net() -> NormalizedNet:
    torch.manual_seed(0)
    return NormalizedNet(build_model("cnn_base", 10), MEAN, STD, CLASSES).eval()


def random_image(height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """A PNG and a JPEG of sizes other than 32x32, and a 32x32 PNG."""
    png, jpeg, small = tmp_path / "photo.png", tmp_path / "photo.jpg", tmp_path / "small.png"
    write_png(random_image(48, 40, 1), str(png))
    jpeg.write_bytes(encode_jpeg(random_image(120, 200, 2), quality=90).numpy().tobytes())
    write_png(random_image(32, 32, 3), str(small))
    return [png, jpeg, small]


def test_top5_per_image_sorted_with_names_from_the_class_list(net, images):
    predictions = predict_files(net, images, "cpu")
    assert [prediction.path for prediction in predictions] == images
    for prediction in predictions:
        names = [name for name, _ in prediction.top]
        probabilities = [probability for _, probability in prediction.top]
        assert len(names) == 5 and len(set(names)) == 5 and set(names) <= set(CLASSES)
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0 <= probability <= 1 for probability in probabilities)
        assert sum(probabilities) <= 1 + 1e-6


def test_images_are_normalized_as_in_training(net, images):
    prediction = predict_files(net, [images[2]], "cpu")[0]
    # A 32x32 PNG is used as it is: pixels / 255, then the training normalization.
    pixels = random_image(32, 32, 3).float().div(255).unsqueeze(0)
    normalized = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(net.net(normalized), dim=1)[0]
    for name, probability in prediction.top:
        assert probability == pytest.approx(expected[CLASSES.index(name)].item(), abs=1e-6)


def test_any_size_becomes_32x32_in_0_1(images):
    for path in images:
        image = read_image(path)
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1


def test_grayscale_image_is_read_as_rgb(tmp_path):
    write_png(random_image(50, 50, 4)[:1], str(tmp_path / "gray.png"))  # one channel
    image = read_image(tmp_path / "gray.png")
    assert image.shape == (3, 32, 32)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])


def test_unusable_files_are_one_line_naming_the_file(net, images, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path in (text, empty, tmp_path / "missing.png", tmp_path):
        with pytest.raises(ImageError) as error:
            predict_files(net, [images[0], path], "cpu")
        message = str(error.value)
        assert str(path) in message and "PNG or JPEG" in message and "\n" not in message


def test_printed_lines_name_the_file_and_its_classes(net, images):
    lines = format_predictions(predict_files(net, images, "cpu"))
    assert len(lines) == len(images)
    for line, path in zip(lines, images):
        assert line.startswith(f"{path}: ") and line.count("%") == 5
