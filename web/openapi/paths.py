"""The document's operations: each route's path, method, summary, inputs (its declaration in ``web/inputs.py``) and
responses."""

from __future__ import annotations

from typing import Any

from web import inputs
from web.fields import Inputs
from web.openapi.responses import API_ERRORS, BODY_ERRORS, header_refs, json_ok, sse_ok
from web.openapi.shapes import STRING, Schema, ref, schema

OPTIONAL_AUTH: list[dict[str, list[str]]] = [{"bearerAuth": []}, {}]


def _errors(*statuses: str) -> dict[str, Schema]:
    return {status: ref("responses", status) for status in statuses}


def _takes(route: Inputs) -> Schema:
    """An operation's parameters and request body, as its route declares them."""
    taken: Schema = {}
    if route.parameters:
        taken["parameters"] = [ref("parameters", field.component) for field in route.parameters]
    if route.body:
        taken["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema(route.body_name)}}}
    return taken


def _operation(operation_id: str, tag: str, summary: str, responses: Schema, description: str = "",
               **more: Any) -> Schema:
    """One operation, its keys in the document's order: ``more`` (its security, or its inputs) before its responses."""
    operation: Schema = {"operationId": operation_id, "tags": [tag], "summary": summary}
    if description:
        operation["description"] = description
    return {**operation, **more, "responses": responses}


def _api(operation_id: str, tag: str, summary: str, route: Inputs, responses: Schema, *statuses: str,
         description: str = "") -> Schema:
    """An /api operation taking ``route``'s inputs: optional bearer auth (required whenever auth is configured), and
    the errors every /api route can answer, plus the body errors for a route that reads a JSON body, plus
    ``statuses``."""
    operation = _operation(operation_id, tag, summary, responses, description, **_takes(route))
    errors = set(API_ERRORS) | set(statuses) | (set(BODY_ERRORS) if "requestBody" in operation else set())
    operation["security"] = OPTIONAL_AUTH
    operation["responses"].update(_errors(*sorted(errors)))
    return operation


def paths() -> dict[str, Schema]:
    html = {"text/html": {"schema": STRING}}
    page = {"200": {"description": "The page.", "headers": header_refs(), "content": html}}
    return {
        "/": {"get": _operation("getRoot", "service", "Service name and version",
                                json_ok("The service answers.", "Root"), security=[])},
        "/health": {
            "get": _operation(
                "getHealth", "service", "Store and model status",
                {**json_ok("healthy or degraded.", "Health"),
                 **json_ok("unhealthy: the store cannot read or write.", "Health", "503")},
                "Probes the store with a read and a small write. degraded (200): the model cannot answer. unhealthy "
                "(503): the store cannot read or write.",
                security=[],
            )
        },
        "/metrics": {
            "get": _operation(
                "getMetrics", "service", "Prometheus metrics",
                {"200": {"description": "Prometheus text format 0.0.4.", "headers": header_refs(),
                         "content": {"text/plain": {"schema": STRING}}},
                 **_errors("401", "404")},
                "Off (404) unless METRICS_TOKEN is set; then only with Authorization: Bearer <METRICS_TOKEN>. Scrape "
                "each instance on its private address.",
                security=[{"metricsToken": []}],
            )
        },
        "/playground": {"get": _operation("getPlayground", "pages", "A small chat page", {**page, **_errors("404")},
                                          "Development only, or with PLAYGROUND=1 (404 otherwise).", security=[])},
        "/openapi.json": {"get": _operation("getOpenApi", "pages", "This document",
                                            json_ok("OpenAPI 3.1.", "OpenAPIDocument"), security=[])},
        "/docs": {"get": _operation("getDocs", "pages", "This document, readable in a browser", page,
                                    "Self-contained: no CDN, no external script. Served in every environment.",
                                    security=[])},
        "/api/chat/stream": {
            "post": _api(
                "streamChat", "chat", "Send a message; stream the answer", inputs.CHAT_STREAM,
                sse_ok("The run's events, live, to its terminal chunk; X-Run-ID names the run."), "404", "409",
                description="Starts a run and follows it from its first event. A repeated client_message_id attaches "
                "to the run it started (replayed after Last-Event-ID if sent, else from event 1; counted as an API "
                "request, not a chat turn), as fetch-event-source's resend of the same request does. A client that "
                "disconnects only stops watching: the answer is generated and saved anyway. The message goes after "
                "the active leaf, or where parent_message_id, edit_message_id or regenerate_message_id says (404 "
                "MESSAGE_NOT_FOUND outside this conversation, 422 for the wrong role); the prompt is the path from "
                "the first message to it.",
            )
        },
        "/api/chat/runs/{run_id}/events": {
            "get": _api(
                "followRun", "chat", "Resume a run's stream", inputs.RUN_EVENTS,
                sse_ok("The run's events after the cursor."), "404",
                description="Replays the run's events after Last-Event-ID (or ?after), then follows it live to its "
                "terminal chunk. A finished run replays and ends.",
            )
        },
        "/api/chat/runs/{run_id}/stop": {
            "post": _api(
                "stopRun", "chat", "Stop a run", inputs.STOP_RUN,
                {**json_ok("The run has ended: the saved assistant message.", "Message"),
                 **json_ok("The stop is asked but the run has not ended yet (its worker is slow, or died and the run "
                           "ends stopped once its heartbeat lapses): the message as saved so far, metadata.status "
                           "streaming.", "Message", "202")},
                "404",
                description="Stops the run wherever it generates and saves its answer cut to seen_chars (status "
                "stopped). Idempotent: a second stop, or one after the run ended, changes nothing.",
            )
        },
        "/api/conversations": {
            "get": _api("listConversations", "conversations", "List conversations", inputs.LIST_CONVERSATIONS,
                        json_ok("One page, most recent activity first.", "ConversationList"),
                        description="Paged by offset, or by cursor (before/after, from an earlier page), not both; q "
                        "searches titles."),
            "post": _api("createConversation", "conversations", "Create a conversation", inputs.CREATE_CONVERSATION,
                         json_ok("Created.", "Conversation", status="201")),
        },
        "/api/conversations/{conversation_id}": {
            "get": _api("getConversation", "conversations", "A conversation and a page of its messages",
                        inputs.GET_CONVERSATION,
                        json_ok("The conversation with messages, oldest first.", "ConversationWithMessages"), "404",
                        description="The messages of one branch (the active one, or ?leaf's), each with parent_id and "
                        "sibling_ids. A running answer shows metadata.status streaming, its run_id, the text so far "
                        "and metadata.seq: attach with GET /api/chat/runs/{run_id}/events?after=<seq>."),
            "patch": _api("renameConversation", "conversations", "Rename a conversation", inputs.RENAME_CONVERSATION,
                          json_ok("Renamed.", "Conversation"), "404"),
            "delete": _api("deleteConversation", "conversations", "Delete a conversation and its messages",
                           inputs.DELETE_CONVERSATION, json_ok("Deleted.", "Deleted"), "404",
                           description="A run still generating in it stops."),
        },
        "/api/conversations/{conversation_id}/active-leaf": {
            "put": _api("setActiveLeaf", "conversations", "Switch branches", inputs.SET_ACTIVE_LEAF,
                        json_ok("Switched: the conversation with its new active_leaf_id.", "Conversation"), "404",
                        description="The branch through message_id, to its newest leaf, becomes the one a reload reads "
                        "and the next send follows. Stored, not kept by the browser."),
        },
        "/api/actions/{action_id}": {
            "get": _api(
                "getAction", "actions", "A prepared change", inputs.GET_ACTION, json_ok("The action.", "PendingAction"),
                "404",
                description="The change as its tool_call chunk showed it, and whether it still waits for confirmation "
                "(status pending), ran (done) or can no longer run (expired): a client that reloads shows its Confirm "
                "button again from this.",
            )
        },
        "/api/actions/{action_id}/confirm": {
            "post": _api(
                "confirmAction", "actions", "Confirm a prepared change", inputs.CONFIRM_ACTION,
                json_ok("Done.", "ActionConfirmed"), "404", "409", "410",
                description="Carries out a change the assistant prepared (a tool_call chunk with status "
                "confirmation_required names its action_id), once, before expires_at, for the user it was prepared "
                "for.",
            )
        },
        "/api/usage": {
            "get": _api(
                "getUsage", "usage", "The caller's usage and budgets", inputs.GET_USAGE,
                json_ok("This UTC day's (or month's) usage.", "UsageReport"),
                description="Every model call of the caller's turns this period (the usage ledger), by model and by "
                "conversation, with the budgets (BUDGET_*: limit and remaining, null when off) and what turns still "
                "generating hold reserved. A chat turn that would pass a budget is refused with 429 "
                "BUDGET_EXCEEDED.",
            )
        },
        "/api/dev/sample-data": {
            "post": _api(
                "loadSampleData", "development", "Load the walk-through's sample records", inputs.LOAD_SAMPLE_DATA,
                json_ok("Loaded.", "SampleDataLoaded"), "404",
                description="Invoices, appointments, projects and the rest, for the caller, as README's walk-through "
                "loads them (the playground's Load sample data). Idempotent: records already there are kept. "
                "Development only: 404 in production, whatever PLAYGROUND says.",
            )
        },
    }
