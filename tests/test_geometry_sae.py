"""SAE measurement: recovers a planted feature count and sparsity; hooks resolve by module path."""
import pytest
import torch
import torch.nn as nn

from opdf_exp.errors import ConfigError
from opdf_exp.geometry import sae as S
from opdf_exp.geometry import theory
from opdf_exp.lit.geometry import train_sae
from opdf_exp.runner.trainer import StageTrainers

# one worker runs the whole module, so its expensive module-scoped fixture runs once (`make test`: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("geometry_sae")


@pytest.fixture(scope="module")
def planted_measurement():
    # notes section 4: d=64, F=512, alpha=0.98, TopK dictionary 512 with k=10
    from opdf_exp.utils.threads import torch_threads

    with torch_threads(1):  # tiny matmuls: one thread is faster and immune to a busy second core
        data = S.planted_superposition(100_000, d=64, n_features=512, alpha=0.98, seed=0)
        cfg = S.SAETrainConfig(kind="topk", n_latents=512, k=10, steps=500, batch_size=1024, lr=1e-2, seed=0)
        sae, scale = train_sae(data.activations, cfg, StageTrainers())
        return data, sae, S.measure(sae, data.activations, scale, alive_threshold=1e-5)


def test_sae_recovers_planted_f_and_alpha(planted_measurement):
    data, sae, m = planted_measurement
    assert abs(m.n_alive - 512) <= 0.05 * 512
    assert abs(m.alpha - 0.98) <= 0.005
    assert m.g == pytest.approx(theory.capacity(m.alpha))
    assert m.d_star == pytest.approx(theory.critical_width_from_l0(m.n_alive, m.l0), rel=1e-9)
    assert m.importances.shape == (m.n_alive,) and (m.importances[:-1] >= m.importances[1:]).all()
    # the dictionary actually found the planted directions (not just the right count)
    cos = (sae.W_dec.t() @ data.directions.t()).abs().max(0).values
    assert (cos > 0.9).float().mean() > 0.8
    floors = m.predicted_floors([1, 8, 64])
    assert floors[0] > floors[1] > floors[2] >= 0


def test_relu_sae_trains_and_decoder_stays_unit_norm():
    data = S.planted_superposition(8192, d=16, n_features=64, alpha=0.9, seed=1)
    cfg = S.SAETrainConfig(kind="relu", n_latents=64, l1_coeff=1e-3, steps=30, batch_size=512, lr=3e-3)
    sae, scale = train_sae(data.activations, cfg, StageTrainers())
    norms = sae.W_dec.norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    m = S.measure(sae, data.activations, scale)
    assert 0 < m.alpha < 1 and m.n_alive <= 64


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return (self.proj(x), "extra")  # HF blocks return tuples


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, x, attention_mask=None):
        for layer in self.layers:
            x = layer(x)[0]
        return x


def test_collect_activations_by_module_path():
    net = _Net()
    batches = [torch.randn(3, 5, 4), torch.randn(2, 5, 4)]
    acts = S.collect_activations(net, "layers[1]", batches)
    assert acts.shape == (25, 4)
    masked = S.collect_activations(net, "layers.0", [{"x": batches[0], "attention_mask": torch.ones(3, 5)}], max_tokens=7)
    assert masked.shape == (7, 4)


def test_unknown_hook_point_lists_close_matches():
    net = _Net()
    with pytest.raises(ConfigError, match="names no module") as err:
        S.collect_activations(net, "layer.1", [torch.randn(1, 2, 4)])
    assert "layers.1" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="close matches: ") as err:
        S.resolve_module(net, "layers.7")
    assert "layers.0" in str(err.value) and "layers.1" in str(err.value)


def test_bad_sae_settings_raise():
    with pytest.raises(ConfigError, match="kind"):
        S.SparseAutoencoder(4, 8, kind="jumprelu")
    with pytest.raises(ConfigError, match="k="):
        S.SparseAutoencoder(4, 8, kind="topk", k=9)
