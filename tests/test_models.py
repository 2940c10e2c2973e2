import pytest
import torch

from cil.core.models import MODEL_NAMES, build_model
from cil.errors import ConfigError

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]
FEATURE_DIM = {"mlp": 400, "reduced_resnet18": 160, "resnet18": 512}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny batches gain nothing from intra-op threads, and on a shared, busy CPU OpenMP barriers make a
    # 2-thread ResNet-18 forward ~20x slower than a 1-thread one (measured: 2.4 s vs 0.11 s).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_output_and_feature_shapes(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=13)
    x = torch.randn(2, *shape)
    feats = model.features(x)
    assert feats.shape == (2, FEATURE_DIM[name]) == (2, model.feature_dim)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 13
    out = model(x)
    assert out.shape == (2, 13)
    torch.testing.assert_close(out, model.head(feats))  # forward is exactly head(features)


def test_full_resnet18_parameter_count():
    # Derived by hand (convs have no bias; a BatchNorm has 2 parameters per channel; 1x1 conv + BN shortcut
    # where the shape changes):
    #   stem    3*64*9 + 2*64                                                                   =     1,856
    #   layer1  2 * (2*64*64*9 + 2*128)                                                         =   147,968
    #   layer2  (64*128*9 + 128*128*9 + 512 + 64*128 + 256) + (2*128*128*9 + 512)              =   525,568
    #   layer3  (128*256*9 + 256*256*9 + 1024 + 128*256 + 512) + (2*256*256*9 + 1024)          = 2,099,712
    #   layer4  (256*512*9 + 512*512*9 + 2048 + 256*512 + 1024) + (2*512*512*9 + 2048)        = 8,393,728
    #   backbone 11,168,832; head 512*100 + 100 = 51,300 -> 11,220,132 (11,173,962 with 10 classes, the
    #   figure usually quoted for the CIFAR ResNet-18).
    assert n_params(build_model("resnet18", (3, 32, 32), 100)) == 11_220_132
    assert n_params(build_model("resnet18", (3, 32, 32), 10)) == 11_173_962
    # Same arithmetic with nf = 20: backbone 1,093,140 + head 160*100 + 100.
    assert n_params(build_model("reduced_resnet18", (3, 32, 32), 100)) == 1_109_240


def test_kwargs_reach_the_model():
    assert build_model("mlp", (1, 28, 28), 10, hidden=(100,)).feature_dim == 100
    assert n_params(build_model("mlp", (1, 28, 28), 10, hidden=(100,))) == 784 * 100 + 100 + 100 * 10 + 10
    assert build_model("resnet18", (3, 32, 32), 10, nf=8).feature_dim == 64


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_channels_last_and_bf16_autocast(name):
    torch.manual_seed(0)
    model = build_model(name, (3, 32, 32), num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    out_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)

    model.train()
    xb = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xb)
        loss = torch.nn.functional.cross_entropy(out, torch.arange(4))
    assert out.dtype == torch.bfloat16 and out.shape == (4, 10) and torch.isfinite(out.float()).all()
    loss.backward()  # gradients flow to the float32 parameters, head included
    assert model.head.weight.grad is not None and torch.isfinite(model.head.weight.grad).all()


def test_unknown_model_names_the_value_and_the_choices():
    with pytest.raises(ConfigError) as err:
        build_model("resnet50", (3, 32, 32), 10)
    msg = str(err.value)
    assert "'resnet50'" in msg and all(name in msg for name in MODEL_NAMES)
