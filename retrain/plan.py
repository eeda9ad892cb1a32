"""How a retrain job trains, is judged and ships: the policy as the job kept it.

A job keeps its policy (``retrain_job.params``) when it is queued, so every attempt, and a
resume, trains the same way even if the policy file changed since.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from genmon.schemas.tables import RetrainJob
from genmon.settings import Settings

if TYPE_CHECKING:
    from genmon.retrain.dataset import BuiltDataset
    from genmon.retrain.gate import GateConfig
    from genmon.retrain.policy import RolloutPolicy


@dataclass(frozen=True)
class Plan:
    """How the job trains and is judged: the policy as it was when the job was queued
    (``retrain_job.params``), so every attempt, and a resume, trains the same way even
    if the policy file changed since; the current policy where the job kept none.

    ``strategy`` is the policy's ``training.strategy`` (``auto`` lets the dataset builder
    choose); a job queued before strategies existed trained with ``sft``."""

    trainer: str
    params: dict[str, Any]
    gate: GateConfig
    rollout: RolloutPolicy
    strategy: str = "sft"

    @classmethod
    def of(cls, job: RetrainJob, settings: Settings) -> Plan:
        from genmon.retrain.gate import GateConfig
        from genmon.retrain.policy import RolloutPolicy, load_policy

        kept = job.params
        if not {"trainer", "training", "gate", "rollout"} <= set(kept):
            policy = load_policy(settings.retrain.policy_file).for_model(job.model_id)
            current = {
                "trainer": policy.training.trainer,
                "training": policy.training.params,
                "strategy": policy.training.strategy,
                "gate": policy.gate.model_dump(mode="json"),
                "rollout": policy.rollout.model_dump(mode="json"),
            }
            # A job queued before rollouts existed kept how it trains, not how it ships.
            training = ("trainer", "training", "gate")
            kept = {**current, **(kept if set(training) <= set(kept) else {})}
        if "training" in job.params:  # kept how it trains: before strategies, sft
            kept = {**kept, "strategy": job.params.get("strategy", "sft")}
        params = dict(kept["training"])
        if settings.retrain.device != "auto":  # the machine's, not the policy's, to say
            params["device"] = settings.retrain.device
        gate, rollout = GateConfig.from_dict(kept["gate"]), kept["rollout"]
        return cls(
            str(kept["trainer"]),
            params,
            gate,
            RolloutPolicy.model_validate(rollout),
            str(kept["strategy"]),
        )

    def trained_strategy(self, dataset: BuiltDataset) -> str:
        """The strategy the job trains with: the one its dataset was built for (the
        manifest's ``strategy``: the policy's, or under ``auto`` the builder's choice; a
        resumed attempt reads the dataset the first one stored), else the policy's
        (``sft`` under ``auto``)."""
        built = dataset.manifest.get("strategy")
        if built:
            return str(built)
        return self.strategy if self.strategy != "auto" else "sft"
