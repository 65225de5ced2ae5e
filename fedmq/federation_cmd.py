"""``fedmq simulate`` and ``fedmq fleet``: a whole federation in one command, and a fleet of
simulated devices against a running stack (they share the heterogeneity options)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from fedmq.settings import get_settings

console = Console()


SLOW_FRACTION = typer.Option(0.0, min=0, max=1, help="Share of slow devices")
SLOWDOWN = typer.Option(0.0, min=0, help="Extra seconds a slow device takes per round")
DROPOUT = typer.Option(0.0, min=0, max=0.99, help="Chance a device vanishes for a round")
LATE_JOINERS = typer.Option(0, min=0, help="Devices that join late")
JOIN_DELAY = typer.Option(0.0, min=0, help="Seconds after the start that late joiners join")
QUORUM = typer.Option(None, min=0.01, max=1, help="Share of updates a round needs")
DEADLINE = typer.Option(120.0, min=1, help="Seconds a round may stay open")


def simulate(  # noqa: PLR0913 (a typer command: each option is an argument)
    dataset: str = typer.Option("digits", help="digits, mnist1d, synthetic, cifar10"),
    model: str = typer.Option("mlp", help="mlp, cnn, resnet18, vit_tiny"),
    partition: str = typer.Option("iid", help="iid, dirichlet, shards, quantity_skew"),
    alpha: float | None = typer.Option(None, help="Dirichlet alpha (partition dirichlet)"),
    clients: int = typer.Option(5, min=1),
    rounds: int = typer.Option(20, min=1),
    local_epochs: int = typer.Option(1, min=1),
    batch_size: int = typer.Option(32, min=1),
    lr: float = typer.Option(0.05),
    momentum: float = typer.Option(0.9),
    proximal_mu: float | None = typer.Option(
        None, min=0, help="FedProx's mu, with --strategy fedprox (default 0.01)"
    ),
    strategy: str = typer.Option("fedavg", help="fedavg, fedprox, fedavgm, fedadam, ..."),
    encoding: str = typer.Option("bf16", help="fp32, bf16, fp16, int8, topk"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("fedmq-out"), help="Folder for metrics.json and the plot"),
    broker: str | None = typer.Option(None, help="amqp://... to run on RabbitMQ"),
    database: str | None = typer.Option(None, help="postgresql+psycopg://... (full mode)"),
    slow_fraction: float = SLOW_FRACTION,
    slowdown: float = SLOWDOWN,
    dropout: float = DROPOUT,
    late_joiners: int = LATE_JOINERS,
    join_delay: float = JOIN_DELAY,
    quorum: float | None = QUORUM,
    deadline: float = DEADLINE,
    max_clients: int | None = typer.Option(
        None, min=1, help="At most this many devices per round (cross-device sampling)"
    ),
    selection: str = typer.Option(
        "uniform", help="How a capped round draws its devices: uniform or availability"
    ),
    run_mode: str = typer.Option(
        "sync", "--mode", help="sync (rounds) or async (FedBuff: buffered, staleness-weighted)"
    ),
    buffer_size: int = typer.Option(10, min=1, help="--mode async: updates per version step"),
    max_staleness: int = typer.Option(
        10, min=0, help="--mode async: refuse updates more versions behind than this"
    ),
    concurrency: int | None = typer.Option(
        None, min=1, help="--mode async: at most this many devices train at once"
    ),
    staleness: str = typer.Option(
        "poly", help="--mode async: staleness weight: poly (1/sqrt(1+s)), constant, hinge"
    ),
    server_lr: float = typer.Option(1.0, min=1e-6, help="--mode async: server learning rate"),
    clip_norm: float | None = typer.Option(
        None, min=1e-12, help="Clip each update's delta to this global L2 norm (any strategy)"
    ),
    split: bool = typer.Option(
        False, "--split", help="SplitFed: device heads/tails, the body on an edge session"
    ),
    split_pipeline: bool = typer.Option(
        False, "--split-pipeline", help="With --split: pipeline each device's micro-batches"
    ),
    dp_noise: float | None = typer.Option(
        None, min=0, help="Differential privacy: noise multiplier z (std = z x clip norm)"
    ),
    dp_clip: float = typer.Option(1.0, min=0, help="DP: clip norm of each update's delta"),
    dp_epsilon: float | None = typer.Option(
        None, min=0, help="DP: ε budget; the run stops before a round would pass it"
    ),
    dp_delta: float = typer.Option(1e-5, min=0, help="DP: δ of the (ε, δ) guarantee"),
    dp_mode: str = typer.Option("central", help="DP: central (on the worker) or local"),
    dp_adaptive: bool = typer.Option(
        False, "--dp-adaptive", help="DP: adaptive clip norm (median, Andrew et al. 2021)"
    ),
    dp_seed: int | None = typer.Option(
        None, help="DP: seed the noise (reproducible, and no privacy against who knows it)"
    ),
    secagg: bool = typer.Option(
        False,
        "--secagg",
        help="SecAgg+ secure aggregation: with --broker/--database through the orchestrator, "
        "a worker and device processes; else in one process",
    ),
    secagg_stage: float = typer.Option(
        60.0, min=1, help="--secagg (full mode): each SecAgg+ stage's time limit, seconds"
    ),
    secagg_drop: float = typer.Option(
        0.0,
        min=0,
        max=0.9,
        help="--secagg without --broker/--database: share of devices that vanish after masking",
    ),
    flower_client: str | None = typer.Option(
        None,
        help="Every device trains with this unmodified Flower client, package.module:object "
        "(needs fedmq[flower]); --model is the run's model, as the ServerApp's",
    ),
) -> None:
    """Run a whole federation: orchestrator, aggregation and N devices over the real wire."""
    common: dict[str, Any] = {
        "dataset": dataset,
        "model": model,
        "partition": partition,
        "partition_args": {} if alpha is None else {"alpha": alpha},
        "clients": clients,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "seed": seed,
        "out": out,
        "broker": broker,
        "database": database,
        "deadline_s": deadline,
    }
    if split and flower_client:
        raise typer.BadParameter("Flower clients train whole models", param_hint="--split")
    if secagg and not (broker or database):
        _simulate_secagg(
            dataset, model, clients, rounds, local_epochs, batch_size, lr, seed, secagg_drop
        )
        return
    if split:
        from simulation.split_sim import SplitSimOptions, run_split

        console.print(f"fedmq simulate --split: {clients} devices, {rounds} rounds, {model}")
        run_split(
            SplitSimOptions(
                **common,
                encoding=encoding if encoding in ("fp32", "bf16", "fp16") else "bf16",
                edge_device=get_settings().worker_device,
                pipeline=split_pipeline,
            ),
            log=console.print,
        )
        console.print(f"metrics: {out / 'split_metrics.json'}")
        return
    from orchestrator.state.policy import SELECTIONS
    from simulation.heterogeneity import Heterogeneity
    from simulation.simulate import SimOptions, run

    if proximal_mu is not None and strategy.lower() != "fedprox":
        # The mu the devices train with is the strategy's: one source (fedmq/wiring.py).
        raise typer.BadParameter(
            "is FedProx's mu: use it with --strategy fedprox", param_hint="--proximal-mu"
        )
    if selection not in SELECTIONS:
        raise typer.BadParameter(f"one of {', '.join(SELECTIONS)}", param_hint="--selection")
    from learning.staleness import POLICIES
    from orchestrator.state.policy import MODES

    if run_mode not in MODES:
        raise typer.BadParameter(f"one of {', '.join(MODES)}", param_hint="--mode")
    if staleness not in POLICIES:
        raise typer.BadParameter(f"one of {', '.join(POLICIES)}", param_hint="--staleness")
    privacy = None
    if dp_noise is not None:
        privacy = {
            "mode": dp_mode,
            "noise_multiplier": dp_noise,
            "clip_norm": dp_clip,
            "delta": dp_delta,
            "epsilon_budget": dp_epsilon,
            "adaptive": {} if dp_adaptive else None,
            "seed": dp_seed,
        }
    elif dp_epsilon is not None or dp_adaptive:
        raise typer.BadParameter("needs --dp-noise", param_hint="--dp-epsilon/--dp-adaptive")
    options = SimOptions(
        **common,
        privacy=privacy,
        proximal_mu=proximal_mu,
        strategy=strategy,
        encoding=encoding,
        quorum=quorum,
        max_clients=max_clients,
        selection=selection,
        heterogeneity=Heterogeneity(slow_fraction, slowdown, dropout, late_joiners, join_delay),
        mode=run_mode,
        buffer_size=buffer_size,
        max_staleness=max_staleness,
        concurrency=concurrency,
        staleness=staleness,
        server_lr=server_lr,
        clip_norm=clip_norm,
        flower_clients=(flower_client,) * clients if flower_client else (),
        secagg={"stage_s": secagg_stage} if secagg else None,
    )
    mode = (
        "full (RabbitMQ + database, worker and devices as processes)"
        if broker
        else ("embedded (in-process bus, SQLite, eager tasks)")
    )
    console.print(f"fedmq simulate: {clients} devices, {rounds} rounds, {mode}")
    result = run(options, get_settings(), console)
    final = result.rows[-1].accuracy if result.rows else None
    console.print(
        f"{len(result.rows)} rounds in {result.seconds:.1f} s"
        + ("" if final is None else f", final accuracy {100 * final:.2f}%")
    )
    for what, path in result.outputs.items():
        console.print(f"{what}: {path}")


def fleet(  # noqa: PLR0913 (a typer command: each option is an argument)
    clients: int = typer.Option(3, min=1, help="Number of device processes"),
    run: str | None = typer.Option(None, help="Run to join (default: create one)"),
    rounds: int = typer.Option(0, min=0, help="Start autorun of this many rounds (0: don't)"),
    dataset: str = typer.Option("digits"),
    model: str = typer.Option("mlp"),
    partition: str = typer.Option("iid"),
    alpha: float | None = typer.Option(None, help="Dirichlet alpha (partition dirichlet)"),
    strategy: str = typer.Option("fedavg", help="Strategy of a run the fleet creates"),
    encoding: str = typer.Option("bf16"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("fedmq-fleet"), help="Folder for logs and results"),
    slow_fraction: float = SLOW_FRACTION,
    slowdown: float = SLOWDOWN,
    dropout: float = DROPOUT,
    late_joiners: int = LATE_JOINERS,
    join_delay: float = JOIN_DELAY,
    quorum: float | None = QUORUM,
    deadline: float = DEADLINE,
    split: bool = typer.Option(
        False, "--split", help="SplitFed devices (fedmq device --split); needs an edge worker"
    ),
) -> None:
    """Start N simulated devices as processes against the running stack (fedmq up)."""
    from simulation import fleet as fleet_mod
    from simulation.heterogeneity import Heterogeneity
    from simulation.simulate import SimOptions

    options = SimOptions(
        dataset=dataset,
        model=model,
        partition=partition,
        partition_args={} if alpha is None else {"alpha": alpha},
        clients=clients,
        rounds=rounds,
        strategy=strategy,
        encoding=encoding,
        seed=seed,
        out=out,
        quorum=quorum,
        deadline_s=deadline,
        heterogeneity=Heterogeneity(slow_fraction, slowdown, dropout, late_joiners, join_delay),
    )
    raise typer.Exit(fleet_mod.run(get_settings(), options, console, run_id=run, split=split))


def _simulate_secagg(
    dataset: str,
    model: str,
    clients: int,
    rounds: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    drop: float,
) -> None:
    """SecAgg+ rounds in one process (simulation/secagg_sim.py), the embedded form; with
    --broker/--database, ``run`` drives secure rounds through the platform instead."""
    from simulation.secagg_sim import SecAggFederation, SecAggSimOptions

    o = SecAggSimOptions(
        clients=clients,
        rounds=rounds,
        drop_after=drop,
        dataset=dataset,
        model=model,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )
    console.print(f"fedmq simulate --secagg: {clients} devices, {rounds} rounds, drop {drop}")
    fed = SecAggFederation(o)
    for n in range(1, rounds + 1):
        r = fed.round(n)
        state = r.failure or f"{len(r.survivors)} inputs summed"
        console.print(
            f"round {n}: {state}; accuracy {r.accuracy:.3f}; {r.seconds:.2f} s; "
            f"{r.bytes_up} B up, {r.bytes_down} B down"
        )
