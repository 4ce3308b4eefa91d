"""The gate on a CRATE-MAE (crate/verify/mae.py through check_model): the correct fast model keeps the
precision rule in every precision this CPU runs, soft and peaky, with each run option; every parameter's
gradient and every part's input gradient has a row; each injected fault that only the fast path sees
(tests/verify/faults.py) breaks it, named by path, part and quantity; the model and the random state are
left as found; the trainer's gate applies to it."""

import pytest
import torch

from crate.models.mae import CRATEMAE
from crate.verify import check_model
from crate.verify.families import has_reference
from crate.verify.mae import parameter_names
from tests.verify.faults import inject

SMALL = dict(img_size=16, patch_size=4, in_chans=2, dim=32, depth=2, heads=4)
PRECISIONS = ["float32", "bfloat16", "float16", "bf16-autocast"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARTS = {"embed", "encoder 0", "encoder 1", "norm", "decoder 0", "decoder 1", "head", "loss", "model"}


def _model(precision="float32", peaky=False, **options) -> CRATEMAE:
    torch.manual_seed(0)
    model = CRATEMAE(**SMALL | options)
    if peaky:  # trained weights concentrate attention: scores of tens (docs/math.md §8.4)
        with torch.no_grad():
            for block in [*model.blocks, *model.decoder_blocks]:
                block.attn.qkv.weight.mul_(4)
    return model.to(DTYPES.get(precision, torch.float32)).train()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("peaky", [False, True], ids=["soft", "peaky"])
def test_correct_mae_passes_in_every_cpu_precision(precision, peaky):
    report = check_model(_model(precision, peaky), precision)
    assert report.passed, report.table()
    assert {row.part for row in report.rows} == PARTS
    assert {row.path for row in report.rows} == {"train", "inference"}


def test_every_parameter_and_every_part_input_gradient_are_checked():
    model = _model()
    expected = set()
    for name in parameter_names(model):
        if name.startswith(("blocks.", "decoder_blocks.")):
            stack, layer, rest = name.split(".", 2)
            part = f"{'encoder' if stack == 'blocks' else 'decoder'} {layer}"
            expected.add((part, "grad " + rest.removeprefix("layers.0.")))
        elif name.startswith(("decoder_norm", "decoder_pred")):
            expected.add(("head", f"grad {name}"))
        else:
            expected.add(("norm" if name.startswith("norm.") else "embed", f"grad {name}"))
    expected |= {(part, "grad input") for part in PARTS - {"model"}}
    assert len(parameter_names(model)) == len(list(model.parameters()))
    rows = check_model(model, "float32").rows
    checked = {(row.part, row.quantity.split(" (")[0]) for row in rows if row.path == "train"}
    assert expected == {pair for pair in checked if pair[1].startswith("grad")}


@pytest.mark.parametrize(
    "options",
    [dict(fused_attn=False), dict(grad_checkpointing=True), dict(norm_pix_loss=True), dict(mask_ratio=0.5)],
    ids=["explicit-attention", "grad-checkpointing", "norm-pix-loss", "mask-ratio-0.5"],
)
def test_each_run_option_passes_and_is_recorded(options):
    model = _model(**{key: value for key, value in options.items() if key != "grad_checkpointing"})
    model.set_grad_checkpointing(options.get("grad_checkpointing", False))
    report = check_model(model, "float32")
    assert report.passed, report.table()
    for key, value in options.items():
        assert report.options[key] == value


FAULT_CASES = [
    ("MAE decoder sign flipped", "float32", ("train", "decoder 0", "output")),
    ("MAE decoder sign flipped", "bf16-autocast", ("train", "decoder 0", "output")),
    ("MAE mask token ignored", "float32", ("train", "embed", "output")),
    ("MAE loss over every patch", "float32", ("train", "loss", "output")),
    ("attention scale off", "float32", ("train", "encoder 0", "z_half")),
]


@pytest.mark.parametrize("fault, precision, first", FAULT_CASES, ids=[f"{c[0]}-{c[1]}" for c in FAULT_CASES])
def test_injected_fault_fails_naming_the_part(monkeypatch, fault, precision, first):
    model = _model(precision)
    inject(monkeypatch, fault)
    report = check_model(model, precision)
    assert not report.passed
    violation = report.first_violation
    assert (violation.path, violation.part, violation.quantity) == first, report.table()
    assert "FAILED" in report.verdict()


def test_a_perturbed_weight_of_the_fast_model_alone_fails():
    """A weight changed in the fast model after the export that the reference is built from: the
    decoder's dictionary scaled by 1.01 between the two reads breaks the decoder layer and the model."""
    from crate.verify import mae

    model = _model()
    original = mae.export_released_mae_state_dict

    def export_then_perturb(fast):
        exported = {key: value.clone() for key, value in original(fast).items()}
        with torch.no_grad():
            fast.decoder_blocks[1].linear.weight.mul_(1.01)
        return exported

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mae, "export_released_mae_state_dict", export_then_perturb)
        report = check_model(model, "float32")
    failed = {(row.path, row.part) for row in report.rows if not row.holds}
    assert ("train", "decoder 1") in failed and ("inference", "model") in failed
    assert not any(part.startswith(("encoder", "decoder 0")) for _, part in failed)


def test_gate_leaves_model_and_random_state_as_found():
    model = _model(drop_rate=0.2, drop_path_rate=0.3)
    for parameter in model.blocks.parameters():  # frozen, as by --freeze: checked all the same
        parameter.requires_grad_(False)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    report = check_model(model, "float32")
    assert report.passed, report.table()
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(module.training for module in model.modules())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert all(parameter.grad is None for parameter in model.parameters())
    assert [parameter.requires_grad for parameter in model.parameters()] == [
        not name.startswith("blocks.") for name, _ in model.named_parameters()
    ]


def test_precision_must_match_the_weights():
    with pytest.raises(ValueError, match=r"bfloat16 weights; the model.s are torch\.float32"):
        check_model(_model(), "bfloat16")


def test_the_trainers_gate_applies_to_crate_mae():
    """crate/train/verification.py gates every model with a reference: a CRATE-MAE now has one."""
    assert has_reference(_model()) and not has_reference(torch.nn.Linear(2, 2))


def _run(model, output):
    """What crate/train/verification.py reads of a Run (crate/train/setup.py), for a CPU float32 run."""
    from types import SimpleNamespace

    distributed = SimpleNamespace(device=torch.device("cpu"), rank=0, is_main=True)
    config = SimpleNamespace(skip_verify=False, amp=False, compile=False, compile_mode="default")
    return SimpleNamespace(
        config=config,
        distributed=distributed,
        model=model,
        compiled=False,
        step=0,
        telemetry_images=None,
        output=output,
        metrics_file=None,
    )


def test_the_trainers_gate_checks_a_crate_mae_run_before_its_first_step(tmp_path, monkeypatch):
    """verify_run on a CRATE-MAE: checked, not skipped (it was "no float64 reference" before), its table
    in verification.json; a fault stops the run with the gate's exit code."""
    import json

    from crate.train.verification import UnverifiedError, verify_run
    from crate.verify import EXIT_FAILED

    record = verify_run(_run(_model(), tmp_path))
    assert record["passed"] is True and record["skipped"] is False
    saved = json.loads((tmp_path / "verification.json").read_text())
    assert {row["part"] for row in saved["reports"][0]["rows"]} == PARTS
    inject(monkeypatch, "MAE decoder sign flipped")
    with pytest.raises(UnverifiedError, match="decoder 0") as failure:
        verify_run(_run(_model(), tmp_path))
    assert failure.value.exit_code == EXIT_FAILED


@pytest.mark.slow
def test_compiled_mae_is_checked_through_torch_compile(monkeypatch):
    """--compile: every piece (embed, compress, layer, unsparsify, norm, head, loss) and the whole model
    run through torch.compile (counted), and pass; 14 to 66 s on a loaded 2-core CPU (inductor cache)."""
    compiled = []
    original = torch.compile

    def counting(function, *args, **kwargs):
        compiled.append(function)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", counting)
    torch.manual_seed(0)
    model = CRATEMAE(img_size=8, patch_size=4, in_chans=1, dim=16, depth=1, heads=2).train()
    report = check_model(model, "float32", compiled=True)
    assert report.passed and report.compiled, report.table()
    assert len(compiled) == 8 and model in compiled
