"""Followers on the real broker: the SDK's :class:`~genmon.follow.ModelFollower` replays
the models topic to the latest version and follows it; :class:`AdapterFollower` serves the
announced LoRA adapter on the tiny model; ``Monitor.follow`` logs the version served."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from incident_support import migrated_engine, sqlite_url
from kafka_support import consume
from retrain_support_model import SupportData, corrections
from retrain_support_registry import fake_base, with_prefix

from genmon.detectors.quality.refusal import is_refusal
from genmon.follow import ModelFollower, followed_fields
from genmon.retrain.announce import ModelAnnouncer
from genmon.retrain.lm import CausalLM, load_lm
from genmon.retrain.registry import create_version, promote, register_model
from genmon.retrain.trainer import LoraTrainer, NullContext, TrainingParams
from genmon.schemas.codec import decode
from genmon.schemas.events import InferenceEvent, ModelEvent
from genmon.sdk import Monitor
from genmon.settings import Settings

WAIT_S = 60.0


def moved(version: str | None, alias: str = "champion", model: str = "chat") -> ModelEvent:
    return ModelEvent.model_validate(
        {
            "model_id": model,
            "alias": alias,
            "version": version,
            "base_uri": "/base",
            "action": "promoted",
        }
    )


def test_a_follower_replays_to_the_latest_version_then_follows(
    kafka_settings: Settings, unique_name: str
) -> None:
    settings = with_prefix(kafka_settings, unique_name)
    first, second = moved("v1"), moved("v2")
    changes: list[ModelEvent] = []
    with ModelAnnouncer(settings) as announcer:
        # Other aliases and other models share the topic; the follower skips them.
        announcer.announce([first, second, moved("v9", "challenger"), moved("v7", model="other")])
        with ModelFollower(settings, "chat", on_change=changes.append) as follower:
            assert follower.wait_ready(WAIT_S)
            assert follower.version == "v2" and changes == [second]  # one call for the replay
            third, fourth = moved("v3"), moved("v4")
            # At least once: a resend of the new event and a late copy of an old one are
            # dropped by event id, and change nothing.
            announcer.announce([third, third, second])
            assert follower.wait_for("v3", WAIT_S)
            announcer.announce(fourth)
            assert follower.wait_for("v4", WAIT_S)
    assert changes == [second, third, fourth]
    assert follower.event == fourth


def test_a_follower_of_a_topic_with_no_announcement_knows_no_version(
    kafka_settings: Settings, unique_name: str
) -> None:
    settings = with_prefix(kafka_settings, unique_name)
    with ModelFollower(settings, "chat") as follower:
        assert follower.wait_ready(WAIT_S)
        assert follower.version is None and not follower.wait_for("v1", 0.1)


def test_followed_fields_fill_only_an_unset_version() -> None:
    class Known:
        version = "v5"

    followers = {"chat": Known()}
    assert followed_fields(followers, None, {"model_id": "chat"}) == {  # type: ignore[arg-type]
        "model_id": "chat",
        "model_version": "v5",
    }
    pinned = {"model_id": "chat", "model_version": "v1"}
    assert followed_fields(followers, None, pinned) == pinned  # type: ignore[arg-type]
    assert followed_fields(followers, {"model_id": "other"}, {}) == {}  # type: ignore[arg-type]
    event = InferenceEvent(model_id="chat", latency_ms=1.0)
    assert followed_fields(followers, event, {}) == {}  # type: ignore[arg-type]


def test_the_adapter_follower_serves_the_announced_adapter_and_survives_a_bad_one(
    kafka_settings: Settings,
    unique_name: str,
    tiny_lm_path: Path,
    support_data: SupportData,
    tmp_path: Path,
) -> None:
    import torch

    torch.set_num_threads(1)
    settings = with_prefix(kafka_settings, unique_name)
    engine = migrated_engine(sqlite_url(tmp_path))
    base = str(tiny_lm_path)
    # A real adapter: the LoRA trainer on corrections of the class the base refuses.
    params = TrainingParams(max_steps=20, learning_rate=5e-3, checkpoint_every=0, device="cpu")
    examples = corrections(support_data.refused[:40])
    trained = LoraTrainer().train(base, examples, params, NullContext(), tmp_path / "run")
    adapter = str(trained.adapter_dir)
    prompts = [pair.prompt for pair in support_data.refused[40:52]]
    failed = threading.Event()

    def loader(base_uri: str, adapter_uri: str | None, device: str) -> CausalLM:
        try:
            return load_lm(base_uri, adapter_uri, device)
        except Exception:
            failed.set()
            raise

    from genmon.retrain.follower import AdapterFollower

    with ModelAnnouncer(settings) as announcer:
        register_model(engine, "chat", base, "v1", announce=announcer.announce)
        with AdapterFollower(settings, "chat", device="cpu", loader=loader) as server:
            assert server.wait_loaded("v1", WAIT_S)
            served, before = server.generate(prompts)
            assert served == "v1"
            tuned = create_version(engine, "chat", None, adapter, "v1").version
            announcer.announce(promote(engine, "chat", tuned))
            assert server.wait_loaded("v2", WAIT_S)
            served, after = server.generate(prompts)
            assert served == "v2"
            assert server.serving is not None and server.serving.artifact_uri == adapter
            # A version whose adapter is missing fails to load; v2 keeps serving.
            broken = create_version(engine, "chat", None, str(tmp_path / "gone"), "v2").version
            announcer.announce(promote(engine, "chat", broken))
            assert failed.wait(WAIT_S)
            assert server.version == "v2" and server.generate(prompts) == ("v2", after)
            assert server.last_error is not None and "gone" in server.last_error
    engine.dispose()
    # It serves exactly the announced adapter, which refuses less than the base.
    assert after == load_lm(base, adapter, "cpu").generate(prompts)
    assert sum(map(is_refusal, after)) < sum(map(is_refusal, before))


def test_the_adapter_follower_refuses_to_answer_before_a_version_loaded(
    kafka_settings: Settings, unique_name: str
) -> None:
    from genmon.retrain.follower import AdapterFollower, NotServingError

    settings = with_prefix(kafka_settings, unique_name)
    with AdapterFollower(settings, "chat", device="cpu") as server:
        assert server.follower.wait_ready(WAIT_S)
        assert server.version is None and not server.wait_loaded(timeout=0.1)
        with pytest.raises(NotServingError, match="wait_loaded"):
            server.generate(["hello"])


def test_monitor_logs_the_version_it_follows(kafka_settings: Settings, unique_name: str) -> None:
    settings = with_prefix(kafka_settings, unique_name, kinds=("models", "inference"))
    with ModelAnnouncer(settings) as announcer, Monitor(settings=settings) as monitor:
        announcer.announce(moved("v2"))
        follower = monitor.follow("chat")
        assert follower.wait_for("v2", WAIT_S)
        monitor.log_inference(model_id="chat", prompt="a", response="b", latency_ms=1.0)
        monitor.log_inference(
            model_id="chat", model_version="pinned", prompt="a", response="b", latency_ms=1.0
        )
        monitor.log_inference(model_id="other", prompt="a", response="b", latency_ms=1.0)
        announcer.announce(moved("v3"))
        assert follower.wait_for("v3", WAIT_S)
        monitor.log_inference(model_id="chat", prompt="a", response="b", latency_ms=1.0)
        assert monitor.flush(WAIT_S)
    records = consume(settings, settings.topic("inference"), expected=4, timeout_s=WAIT_S)
    logged = [decode(r.value, InferenceEvent) for r in records]
    assert sorted((e.model_id, e.model_version) for e in logged) == [
        ("chat", "pinned"),
        ("chat", "v2"),
        ("chat", "v3"),
        ("other", "unknown"),
    ]


def test_models_promote_announces_and_models_follow_prints_it(
    kafka_settings: Settings, unique_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import genmon.cli.models as cli

    settings = with_prefix(kafka_settings, unique_name)
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    url = sqlite_url(tmp_path)
    engine = migrated_engine(url)
    register_model(engine, "chat", str(fake_base(tmp_path / "base")), "v1")
    create_version(engine, "chat", None, "/adapters/v2", "v1")
    engine.dispose()
    runner = CliRunner()
    promoted = runner.invoke(cli.models, ["promote", "chat", "v2", "--url", url])
    assert promoted.exit_code == 0, promoted.output
    assert f"announced on {settings.topic('models')}" in promoted.output
    followed = runner.invoke(cli.models, ["follow", "chat", "--once", "--json"])
    assert followed.exit_code == 0, followed.output
    shown = json.loads(followed.output)
    assert (shown["state"], shown["version"], shown["artifact_uri"]) == (
        "announced",
        "v2",
        "/adapters/v2",
    )
    nothing = runner.invoke(cli.models, ["follow", "other", "--once"])
    assert "nothing announced for other champion" in str(nothing.exception)
