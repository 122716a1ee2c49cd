import torch
from torch import nn

from fervid.model.registry import count_parameters, create_model


def test_seed_parameter_count_matches_keras():
    net = create_model("seed")
    trainable, keras_count = count_parameters(net)
    assert trainable == 5_902_151
    assert keras_count == 5_905_863


def test_seed_shape_at_every_layer():
    net = create_model("seed").eval()
    shapes: list[tuple[str, tuple]] = []
    for layer in [*net.features, *net.classifier]:
        layer.register_forward_hook(lambda m, i, o: shapes.append((type(m).__name__, tuple(o.shape[1:]))))
    out = net(torch.zeros(2, 1, 48, 48))
    assert out.shape == (2, 7)
    convs = [s for name, s in shapes if name == "Conv2d"]
    assert convs == [
        (64, 46, 46), (64, 46, 46),
        (128, 23, 23), (128, 23, 23),
        (256, 11, 11), (256, 11, 11),
        (512, 5, 5), (512, 5, 5),
    ]  # fmt: skip
    pools = [s for name, s in shapes if name == "MaxPool2d"]
    assert pools == [(64, 23, 23), (128, 11, 11), (256, 5, 5), (512, 2, 2)]
    linears = [s for name, s in shapes if name == "Linear"]
    assert linears == [(512,), (256,), (128,), (7,)]
    assert [name for name, _ in shapes].count("BatchNorm2d") == 7
    assert ("Flatten", (2048,)) in shapes


def test_seed_layer_details_follow_keras():
    net = create_model("seed")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].padding == (0, 0) and all(c.padding == (1, 1) for c in convs[1:])
    assert all(c.kernel_size == (3, 3) for c in convs)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(b.eps == 1e-3 and abs(b.momentum - 0.01) < 1e-9 for b in bns)
    drops = [m.p for m in net.modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.5, 0.5, 0.5, 0.5, 0.4, 0.4, 0.5]
    # L2 0.01 on the first kernel only.
    reg = net.regularization_loss()
    assert torch.isclose(reg, 0.01 * convs[0].weight.pow(2).sum())


def test_small_runs_and_carries_its_config():
    net = create_model("small").eval()
    assert net(torch.zeros(3, 1, 48, 48)).shape == (3, 7)
    assert net.cfg.input_size == (1, 48, 48)
    assert net.cfg.classes == ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")


def test_resnet_halves_the_resolution_per_stage_with_residual_blocks():
    net = create_model("resnet").eval()
    shapes: list[tuple] = []
    for block in net.features:
        block.register_forward_hook(lambda m, i, o: shapes.append((type(m).__name__, tuple(o.shape[1:]))))
    assert net(torch.zeros(2, 1, 48, 48)).shape == (2, 7)
    blocks = [s for name, s in shapes if name == "_BasicBlock"]
    assert blocks == [(64, 24, 24), (128, 12, 12), (256, 6, 6), (256, 6, 6)]
    assert net.cfg.architecture == "resnet" and net.cfg.input_size == (1, 48, 48)


def test_every_tta_mode_at_once_gives_each_modes_own_numbers_computing_each_view_once():
    """`fervid eval --tta all` reports none, flip, tencrop and affine from 24 views: the face itself and its mirror
    are views of every mode, the ten of tencrop and the fourteen warps of affine are the rest. Each mode's
    probabilities are the mean over its own views, as computed alone."""
    from fervid.model.config import AFFINE_WARPS, TTA_MODES
    from fervid.model.loader import load_model
    from fervid.model.predict import predict_proba_modes, preprocess, tta_views

    torch.manual_seed(0)
    net = load_model("small").net
    faces = torch.randint(0, 256, (24, 48, 48), dtype=torch.uint8)
    passes = []
    net.register_forward_pre_hook(lambda m, i: passes.append(len(i[0])))
    got = predict_proba_modes(net, faces, TTA_MODES, batch_size=24)
    assert passes == [24] * (10 + 2 * len(AFFINE_WARPS)) and len(AFFINE_WARPS) == 7
    with torch.inference_mode():
        for mode, n_views in (("none", 1), ("flip", 2), ("tencrop", 10), ("affine", 16)):
            views = tta_views(preprocess(faces, net.cfg), mode)
            assert len(views) == n_views
            want = sum(net(v.contiguous(memory_format=torch.channels_last)).softmax(1) for v in views) / n_views
            assert torch.allclose(got[mode], want, atol=1e-6), mode
    assert not torch.allclose(got["affine"], got["tencrop"], atol=1e-3)
    # The warps stay within the range training warps faces in, so the net sees at test time what it learnt on.
    import inspect

    from fervid.training.augment import augment

    limits = {k: v.default for k, v in inspect.signature(augment).parameters.items()}
    for deg, scale, tx, ty in AFFINE_WARPS:
        assert abs(deg) <= limits["max_rotate_deg"] and limits["scale"][0] <= scale <= limits["scale"][1]
        assert max(abs(tx), abs(ty)) <= limits["max_shift"]
    assert not torch.allclose(got["flip"], got["none"], atol=1e-3)  # the views differ: each mode is its own
