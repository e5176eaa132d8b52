"""The document's operations: each route's path, method, summary, inputs (its declaration in ``web/inputs.py``) and
responses."""

from __future__ import annotations

from web import inputs
from web.fields import Inputs
from web.openapi.responses import API_ERRORS, BODY_ERRORS, header_refs, json_ok, sse_ok
from web.openapi.shapes import Schema, ref, schema

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


def _api(operation: Schema, *statuses: str) -> Schema:
    """An /api operation: optional bearer auth (required whenever auth is configured), and the errors every /api
    route can answer, plus the body errors for a route that reads a JSON body, plus ``statuses``."""
    errors = set(API_ERRORS) | set(statuses) | (set(BODY_ERRORS) if "requestBody" in operation else set())
    operation["security"] = OPTIONAL_AUTH
    operation["responses"].update(_errors(*sorted(errors)))
    return operation


def paths() -> dict[str, Schema]:
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/": {
            "get": {
                "operationId": "getRoot", "tags": ["service"], "summary": "Service name and version",
                "security": [], "responses": json_ok("The service answers.", "Root"),
            }
        },
        "/health": {
            "get": {
                "operationId": "getHealth", "tags": ["service"], "summary": "Store and model status",
                "description": "Probes the store with a read and a small write. degraded (200): the model cannot "
                "answer. unhealthy (503): the store cannot read or write.",
                "security": [],
                "responses": {
                    **json_ok("healthy or degraded.", "Health"),
                    "503": {**json_ok("unhealthy: the store cannot read or write.", "Health")["200"]},
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics", "tags": ["service"], "summary": "Prometheus metrics",
                "description": "Off (404) unless METRICS_TOKEN is set; then only with Authorization: Bearer "
                "<METRICS_TOKEN>. Scrape each instance on its private address.",
                "security": [{"metricsToken": []}],
                "responses": {
                    "200": {
                        "description": "Prometheus text format 0.0.4.",
                        "headers": header_refs(),
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors("401", "404"),
                },
            }
        },
        "/playground": {
            "get": {
                "operationId": "getPlayground", "tags": ["pages"], "summary": "A small chat page",
                "description": "Development only, or with PLAYGROUND=1 (404 otherwise).",
                "security": [],
                "responses": {
                    "200": {"description": "The page.", "headers": header_refs(), "content": html},
                    **_errors("404"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "getOpenApi", "tags": ["pages"], "summary": "This document",
                "security": [], "responses": json_ok("OpenAPI 3.1.", "OpenAPIDocument"),
            }
        },
        "/docs": {
            "get": {
                "operationId": "getDocs", "tags": ["pages"], "summary": "This document, readable in a browser",
                "description": "Self-contained: no CDN, no external script. Served in every environment.",
                "security": [],
                "responses": {"200": {"description": "The page.", "headers": header_refs(), "content": html}},
            }
        },
        "/api/chat/stream": {
            "post": _api(
                {
                    "operationId": "streamChat", "tags": ["chat"], "summary": "Send a message; stream the answer",
                    "description": "Starts a run and follows it from its first event. A repeated client_message_id "
                    "attaches to the run it started (replayed from event 1, not counted against limits). A client "
                    "that disconnects only stops watching: the answer is generated and saved anyway. The message "
                    "goes after the active leaf, or where parent_message_id, edit_message_id or "
                    "regenerate_message_id says (404 MESSAGE_NOT_FOUND outside this conversation, 422 for the wrong "
                    "role); the prompt is the path from the first message to it.",
                    **_takes(inputs.CHAT_STREAM),
                    "responses": sse_ok("The run's events, live, to its terminal chunk; X-Run-ID names the run."),
                },
                "404", "409",
            )
        },
        "/api/chat/runs/{run_id}/events": {
            "get": _api(
                {
                    "operationId": "followRun", "tags": ["chat"], "summary": "Resume a run's stream",
                    "description": "Replays the run's events after Last-Event-ID (or ?after), then follows it live to "
                    "its terminal chunk. A finished run replays and ends.",
                    **_takes(inputs.RUN_EVENTS),
                    "responses": sse_ok("The run's events after the cursor."),
                },
                "404",
            )
        },
        "/api/chat/runs/{run_id}/stop": {
            "post": _api(
                {
                    "operationId": "stopRun", "tags": ["chat"], "summary": "Stop a run",
                    "description": "Stops the run wherever it generates and saves its answer cut to seen_chars "
                    "(status stopped). Idempotent: a second stop, or one after the run ended, changes nothing.",
                    **_takes(inputs.STOP_RUN),
                    "responses": {
                        **json_ok("The run has ended: the saved assistant message.", "Message"),
                        **json_ok("The stop is asked but the run has not ended yet (its worker is slow, or died and "
                                  "the run ends stopped once its heartbeat lapses): the message as saved so far, "
                                  "metadata.status streaming.", "Message", "202"),
                    },
                },
                "404",
            )
        },
        "/api/conversations": {
            "get": _api(
                {
                    "operationId": "listConversations", "tags": ["conversations"], "summary": "List conversations",
                    "description": "Paged by offset, or by cursor (before/after, from an earlier page), not both; "
                    "q searches titles.",
                    **_takes(inputs.LIST_CONVERSATIONS),
                    "responses": json_ok("One page, most recent activity first.", "ConversationList"),
                },
            ),
            "post": _api(
                {
                    "operationId": "createConversation", "tags": ["conversations"],
                    "summary": "Create a conversation",
                    **_takes(inputs.CREATE_CONVERSATION),
                    "responses": json_ok("Created.", "Conversation", status="201"),
                },
            ),
        },
        "/api/conversations/{conversation_id}": {
            "get": _api(
                {
                    "operationId": "getConversation", "tags": ["conversations"],
                    "summary": "A conversation and a page of its messages",
                    "description": "The messages of one branch (the active one, or ?leaf's), each with parent_id and "
                    "sibling_ids. A running answer shows metadata.status streaming, its run_id, the text so far "
                    "and metadata.seq: attach with GET /api/chat/runs/{run_id}/events?after=<seq>.",
                    **_takes(inputs.GET_CONVERSATION),
                    "responses": json_ok("The conversation with messages, oldest first.",
                                         "ConversationWithMessages"),
                },
                "404",
            ),
            "patch": _api(
                {
                    "operationId": "renameConversation", "tags": ["conversations"],
                    "summary": "Rename a conversation",
                    **_takes(inputs.RENAME_CONVERSATION),
                    "responses": json_ok("Renamed.", "Conversation"),
                },
                "404",
            ),
            "delete": _api(
                {
                    "operationId": "deleteConversation", "tags": ["conversations"],
                    "summary": "Delete a conversation and its messages",
                    "description": "A run still generating in it stops.",
                    **_takes(inputs.DELETE_CONVERSATION),
                    "responses": json_ok("Deleted.", "Deleted"),
                },
                "404",
            ),
        },
        "/api/conversations/{conversation_id}/active-leaf": {
            "put": _api(
                {
                    "operationId": "setActiveLeaf", "tags": ["conversations"], "summary": "Switch branches",
                    "description": "The branch through message_id, to its newest leaf, becomes the one a reload "
                    "reads and the next send follows. Stored, not kept by the browser.",
                    **_takes(inputs.SET_ACTIVE_LEAF),
                    "responses": json_ok("Switched: the conversation with its new active_leaf_id.", "Conversation"),
                },
                "404",
            )
        },
        "/api/actions/{action_id}": {
            "get": _api(
                {
                    "operationId": "getAction", "tags": ["actions"], "summary": "A prepared change",
                    "description": "The change as its tool_call chunk showed it, and whether it still waits for "
                    "confirmation (status pending), ran (done) or can no longer run (expired): a client that reloads "
                    "shows its Confirm button again from this.",
                    **_takes(inputs.GET_ACTION),
                    "responses": json_ok("The action.", "PendingAction"),
                },
                "404",
            )
        },
        "/api/actions/{action_id}/confirm": {
            "post": _api(
                {
                    "operationId": "confirmAction", "tags": ["actions"], "summary": "Confirm a prepared change",
                    "description": "Carries out a change the assistant prepared (a tool_call chunk with status "
                    "confirmation_required names its action_id), once, before expires_at, for the user it was "
                    "prepared for.",
                    **_takes(inputs.CONFIRM_ACTION),
                    "responses": json_ok("Done.", "ActionConfirmed"),
                },
                "404", "409", "410",
            )
        },
        "/api/dev/sample-data": {
            "post": _api(
                {
                    "operationId": "loadSampleData", "tags": ["development"],
                    "summary": "Load the walk-through's sample records",
                    "description": "Invoices, appointments, projects and the rest, for the caller, as README's "
                    "walk-through loads them (the playground's Load sample data). Idempotent: records already there "
                    "are kept. Development only: 404 in production, whatever PLAYGROUND says.",
                    **_takes(inputs.LOAD_SAMPLE_DATA),
                    "responses": json_ok("Loaded.", "SampleDataLoaded"),
                },
                "404",
            )
        },
    }

