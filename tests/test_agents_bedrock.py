"""The agent loop over the fake Bedrock: hand-off, toolUse, toolResult, final text; one specialist loop per turn."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.testclient import TestClient

from services.agents.assistant import HANDOFF_TOOL
from tests.conftest import AuthHeaders
from tests.fake_bedrock import FakeBedrock, Reply, message_start, message_stop, metadata, text_reply, tool_use
from tests.support import chunks, new_id, streamed_text
from tests.test_bedrock import api, bedrock_env, fake_bedrock  # noqa: F401  (fixtures)


def tool_reply(tool_use_id: str, name: str, arguments: dict[str, Any], usage: tuple[int, int]) -> Reply:
    frames = tool_use(0, tool_use_id, name, [json.dumps(arguments)])
    return Reply.stream([message_start(), *frames, message_stop("tool_use"), metadata(*usage)])


def test_a_tool_using_turn_over_bedrock_costs_one_specialist_loop(
    api: tuple[TestClient, FakeBedrock], auth_headers: AuthHeaders, user_id: str  # noqa: F811
) -> None:
    client, fake = api
    fake.replies = [
        tool_reply("tooluse_h", HANDOFF_TOOL, {"agent": "invoices"}, (40, 8)),
        tool_reply("tooluse_1", "list_invoices", {"status": "overdue", "limit": 5}, (90, 12)),
        Reply.stream(text_reply("You have no ", "overdue invoices.", usage=(120, 6))),
    ]
    body = {"message": "Any overdue invoices?", "conversation_id": new_id(), "user_id": user_id}
    response = client.post("/api/chat/stream", json=body, headers=auth_headers(user_id))
    items = chunks(response.text)

    supervisor, specialist, after_tool = (r.body for r in fake.wait_for_requests(3))
    assert len(fake.requests) == 3  # one routing call + one specialist loop of two calls; nothing regenerated
    assert [t["toolSpec"]["name"] for t in supervisor["toolConfig"]["tools"]] == [HANDOFF_TOOL]
    assert len(specialist["toolConfig"]["tools"]) == 5
    tool_turn, result_turn = after_tool["messages"][-2:]
    assert tool_turn["content"][-1]["toolUse"]["name"] == "list_invoices"
    result = result_turn["content"][0]["toolResult"]
    assert result["toolUseId"] == "tooluse_1" and result["status"] == "success"
    assert result["content"][0]["json"] == {"table": "invoices", "count": 0, "rows": []}

    sequence = [(i["type"], i["tool_name"], (i["tool_call"] or {}).get("status"), i["agent_type"]) for i in items]
    assert sequence == [
        ("tool_call", HANDOFF_TOOL, "success", "supervisor"),
        ("tool_call", "list_invoices", "started", "invoices"),
        ("tool_call", "list_invoices", "success", "invoices"),
        *[("token", None, None, "invoices")] * (len(items) - 4),
        ("complete", None, None, "invoices"),
    ]
    assert streamed_text(items) == "You have no overdue invoices."
    assert items[-1]["usage"] == {"input_tokens": 250, "output_tokens": 26,
                                  "cost": pytest.approx((250 * 0.06 + 26 * 0.24) / 1e6)}  # Nova Lite's shipped price
    assert items[1]["tool_call"]["arguments"] == {"status": "overdue", "limit": 5}
