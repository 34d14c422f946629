"""32 ``exec``s of ``sleep 0.5`` sent at once: does one slow request hold the others?

All 32 clients connect at the same moment and wait for their answers, each for at most
``CAP`` seconds from the start. The time is until the last client is done (answered or given
up). An agent that does not answer all 32 within the cap is reported with the cap as its time
(a lower bound). The reference serves one connection at a time with a backlog of 1, so most of
its clients are reset or time out: the note counts them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from benchmarks.harness import OURS, REFERENCE, Agent, Bench, Row, call

NAME = "concurrent"
ORDER = 90
CLIENTS = 32
REQUEST = {"command": "sleep 0.5", "timeout_seconds": 30}
# A one-at-a-time agent needs at least 32 x 0.5 = 16 s even if no client were turned away.
CAP = 20.0


def _outcome(agent: Agent, start: threading.Barrier, deadline: float) -> str:
    start.wait()
    try:
        answer = call(agent.port, REQUEST, timeout=max(0.01, deadline - time.monotonic()))
    except TimeoutError:
        return "timed out"
    except ConnectionResetError:
        return "reset"
    except ConnectionRefusedError:
        return "refused"
    except OSError as error:
        return type(error).__name__
    except ValueError:
        return "bad answer"
    if "error" in answer:
        return "error answer"
    return "ok" if answer.get("exit_code") == 0 else "bad exit code"


def _describe(outcomes: Counter[str]) -> str:
    answered = outcomes.get("ok", 0)
    failures = ", ".join(f"{count} {kind}" for kind, count in outcomes.items() if kind != "ok")
    return f"{answered}/{CLIENTS} answered" + (f" ({failures})" if failures else "")


def run(bench: Bench) -> list[Row]:
    cap = CAP

    def measure(agent: Agent) -> tuple[float, Counter[str]]:
        barrier = threading.Barrier(CLIENTS + 1)
        with ThreadPoolExecutor(CLIENTS) as pool:
            deadline = time.monotonic() + cap
            futures = [pool.submit(_outcome, agent, barrier, deadline) for _ in range(CLIENTS)]
            barrier.wait()
            started = time.monotonic()
            outcomes = Counter(future.result() for future in futures)
            elapsed = time.monotonic() - started
        # Not all answered: the time to answer all 32 is unknown but at least the cap.
        return (elapsed if outcomes.get("ok", 0) == CLIENTS else cap), outcomes

    rounds = bench.alternate(1, measure)
    (oursTime, oursOutcomes), (referenceTime, referenceOutcomes) = (
        rounds[OURS][0],
        rounds[REFERENCE][0],
    )
    return [
        Row(
            f"{CLIENTS} concurrent `sleep 0.5` execs",
            "s",
            oursTime,
            referenceTime,
            goal=0.05,
            note=f"ours {_describe(oursOutcomes)}; reference {_describe(referenceOutcomes)}; "
            f"an agent that leaves any unanswered is given the cap, {cap:g} s",
        )
    ]
