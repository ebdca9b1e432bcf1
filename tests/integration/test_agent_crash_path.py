"""The agent's crash path stops every engine even while drain tasks remove instances under it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from agent.engines.base import EngineLaunch
from agent.runtime import Agent, AgentConfig
from agent.supervisor import EngineProcess
from controlplane.store import EtcdConfig


async def test_crash_cleanup_survives_drains_that_finish_meanwhile(tmp_path: Path) -> None:
    agent = Agent(AgentConfig(etcd=EtcdConfig(), node_id="crash-node", gpus=[], serve=[]))
    engines = []
    for i in range(3):
        # the first engine ignores SIGTERM, so its stop takes the whole grace: drains finish meanwhile
        argv = ("sh", "-c", "trap '' TERM; sleep 60") if i == 0 else ("sleep", "60")
        eng = EngineProcess(EngineLaunch(argv), "http://127.0.0.1:9", tmp_path / f"engine-{i}.log")
        await eng.start()
        engines.append(eng)
        agent.instances[f"a{i}"] = SimpleNamespace(engine=eng)  # type: ignore[assignment]

    async def draining(key: str) -> None:  # like Agent._stop_instance: the instance leaves when it ends
        try:
            await asyncio.sleep(0.2)
        finally:
            agent.instances.pop(key, None)

    for key in list(agent.instances):
        agent._stopping[key] = asyncio.create_task(draining(key))
    await asyncio.sleep(0)
    await asyncio.wait_for(agent._stop_engines_now(), 30)
    assert [e.running for e in engines] == [False, False, False]
