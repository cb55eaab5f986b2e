"""Token usage of runs and run steps: summed one way by the gateway and the run orchestrator alike."""


def add_usage(*usages: dict[str, int] | None) -> dict[str, int]:
    """Sum token counts (zeros when none is known: a run or step that ended always has `usage`, per the SDK)."""
    known = [u for u in usages if u]
    total = {k: sum(int(u.get(k, 0)) for u in known) for k in ("prompt_tokens", "completion_tokens")}
    total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
    return total
