"""Exactness of the DiLoCo core against plain and synchronous training."""

import torch

from swarm.training.diloco import (
    CachedHash,
    DiLoCoConfig,
    OuterOptimizer,
    average_weighted,
    flatten_parameters,
    hash_parameters,
    load_flat_parameters_,
)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(5, 8, generator=generator), torch.randn(5, 4, generator=generator)) for _ in range(count)
    ]


def _loss(model, batch):
    inputs, targets = batch
    return torch.nn.functional.mse_loss(model(inputs), targets)


def test_one_member_outer_lr_one_without_momentum_equals_plain_training():
    config = DiLoCoConfig(inner_lr=1e-2, warmup_steps=0, outer_lr=1.0, outer_momentum=0.0)
    batches = _batches(1, 4 * 5)

    plain = _model()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for batch in batches:
        plain_opt.zero_grad()
        _loss(plain, batch).backward()
        plain_opt.step()

    member = _model()
    outer = OuterOptimizer(flatten_parameters(member), config)
    inner = torch.optim.AdamW(member.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for round_index in range(4):
        for batch in batches[round_index * 5 : (round_index + 1) * 5]:
            inner.zero_grad()
            _loss(member, batch).backward()
            inner.step()
        new_global = outer.step(outer.pseudo_gradient(flatten_parameters(member)))
        load_flat_parameters_(member, new_global)

    assert outer.round == 4
    torch.testing.assert_close(flatten_parameters(member), flatten_parameters(plain), rtol=0, atol=1e-6)


def test_h1_sgd_inside_and_outside_equals_synchronous_sgd():
    members, steps, inner_lr, outer_lr = 3, 6, 0.05, 0.5
    config = DiLoCoConfig(inner_lr=inner_lr, outer_lr=outer_lr, outer_momentum=0.0)
    data = [_batches(100 + m, steps) for m in range(members)]

    sync = _model()
    sync_opt = torch.optim.SGD(sync.parameters(), lr=inner_lr * outer_lr)
    for step in range(steps):
        sync_opt.zero_grad()
        # Mean loss over members' batches: the gradient is the mean of their gradients.
        (sum(_loss(sync, data[m][step]) for m in range(members)) / members).backward()
        sync_opt.step()

    replicas = [_model() for _ in range(members)]
    outer = OuterOptimizer(flatten_parameters(replicas[0]), config)
    for step in range(steps):
        contributions = []
        for m, replica in enumerate(replicas):
            load_flat_parameters_(replica, outer.parameters.detach())
            inner = torch.optim.SGD(replica.parameters(), lr=inner_lr)
            inner.zero_grad()
            _loss(replica, data[m][step]).backward()
            inner.step()
            contributions.append((1.0, outer.pseudo_gradient(flatten_parameters(replica))))
        outer.step(average_weighted(contributions))

    torch.testing.assert_close(outer.parameters.detach(), flatten_parameters(sync), rtol=0, atol=1e-6)


def test_weighted_average_counts_samples_and_newcomers_add_nothing():
    a, b, newcomer = torch.full((4,), 1.0), torch.full((4,), 4.0), torch.full((4,), 100.0)
    result = average_weighted([(30, a), (10, b), (0, newcomer)])
    torch.testing.assert_close(result, torch.full((4,), (30 * 1.0 + 10 * 4.0) / 40))


def test_outer_state_round_trip_continues_bit_identically():
    config = DiLoCoConfig()
    start = torch.randn(100, generator=torch.Generator().manual_seed(0))
    first, second = OuterOptimizer(start, config), OuterOptimizer(torch.zeros(100), config)
    first.step(torch.randn(100, generator=torch.Generator().manual_seed(1)))
    second.load_state_dict(first.state_dict())
    update = torch.randn(100, generator=torch.Generator().manual_seed(2))
    first.step(update)
    second.step(update.clone())
    assert hash_parameters(first.parameters) == hash_parameters(second.parameters)
    assert first.round == second.round == 2


def test_config_errors_name_the_flag():
    import pytest

    with pytest.raises(ValueError, match="--outer-momentum"):
        DiLoCoConfig(outer_momentum=1.5)


def test_cached_hash_follows_every_change_of_the_outer_parameters():
    outer = OuterOptimizer(flatten_parameters(_model(0)), DiLoCoConfig())
    cached = CachedHash()
    first = cached(outer.parameters)
    assert first == hash_parameters(outer.parameters)
    assert cached(outer.parameters) == first and cached.computed == 1  # unchanged: not rehashed
    outer.step(torch.full_like(outer.parameters, 0.01))  # an outer step changes them in place
    assert cached(outer.parameters) == hash_parameters(outer.parameters) != first
    state = OuterOptimizer(flatten_parameters(_model(1)), DiLoCoConfig()).state_dict()
    outer.load_state_dict(state)  # a state synced from a donor
    assert cached(outer.parameters) == hash_parameters(state["parameters"])
    assert cached.computed == 3
