import pytest
from torch import nn

from sn_lightning.modes import eval_mode


def _fail_inside(model: nn.Module) -> None:
    with eval_mode(model) as m:
        assert m is model and not any(x.training for x in model.modules())
        raise RuntimeError("inside")


def test_eval_mode_restores_mixed_modes_also_after_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    with pytest.raises(RuntimeError, match="inside"):
        _fail_inside(model)
    assert [x.training for x in model.modules()] == [True, True, False, True]
