"""`train.device`: the trainer runs where the recipe says, and a GPU computes the same losses."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch not installed (training extra)")

from conftest import TINY_CONFIG  # noqa: E402

from reir.training.config import ConfigError, StageConfig, load_config  # noqa: E402
from reir.training.trainer import Trainer, resolve_device  # noqa: E402

ALL_TERMS = StageConfig(name="all", steps=1, detection=True, rec=True, clia=True, train_text=True)


def test_device_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"train\.device: 'tpu' is not one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--device: 'cuda', but this torch sees no GPU"):
            resolve_device("cuda", "--device")


def _first_batch_loss(synth_small, tmp_path, device: str) -> tuple[float, dict[str, float], torch.Tensor]:
    overrides = {"out_dir": str(tmp_path), "data.root": str(synth_small), "data.workers": 0, "train.device": device}
    trainer = Trainer(load_config(TINY_CONFIG, overrides), progress=False)
    trainer.model.text.freeze(1)
    trainer.model.eval()  # no dropout: the two devices draw different random masks
    _, batch = next(trainer.batches(0))
    total, logs = trainer.loss(batch, ALL_TERMS)
    total.backward()
    grad = trainer.model.decoder.layers[0].self_attn.in_proj_weight.grad
    return float(total), logs, grad.cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_computes_the_cpu_losses_and_gradients(synth_small, tmp_path):
    """Every term (detection, REC selection, CLIA) on one batch, same weights and data. TF32 is
    off: its 10-bit mantissa moves the encoder's top-k proposals, a real but irrelevant change."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu_total, cpu_logs, cpu_grad = _first_batch_loss(synth_small, tmp_path / "cpu", "cpu")
    gpu_total, gpu_logs, gpu_grad = _first_batch_loss(synth_small, tmp_path / "gpu", "cuda")
    assert {"class", "select", "clia"} <= set(cpu_logs)
    for name, value in cpu_logs.items():
        assert gpu_logs[name] == pytest.approx(value, rel=2e-3, abs=1e-4), name
    assert gpu_total == pytest.approx(cpu_total, rel=2e-3)
    assert torch.allclose(gpu_grad, cpu_grad, rtol=1e-2, atol=1e-4)
