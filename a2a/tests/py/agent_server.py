"""A stock a2a-sdk 1.3.0 agent for the front door and adapter tests.

Serves JSON-RPC (v1.0, and v0.3 through the SDK's compatibility layer) at `/` and HTTP+JSON
at `/rest`, with the SDK's own card routes. What it does with the user's text:

- anything else: a task whose artifact is "<name>: <text>", completed (streamed as a working
  status, the artifact and the completed status);
- "ask": the task stops in input-required ("<name>: what else?"); a follow-up message on that task completes it with
  "<name> got: <text>";
- "die": the task starts working, then the process exits (an agent dying mid-stream);
- "hang": nothing for 30 s (an agent that hangs).

Its card's skills are --skill, plus one per line of --extra-skills FILE when that file exists
(read at every card request, so a test can change the card under a running agent).

Usage: python3 agent_server.py --port P --name NAME [--skill echo] [--extra-skills FILE]
"""

import argparse
import asyncio
import json
import os

import uvicorn
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse

from a2a.helpers import new_task_from_user_message, new_text_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import (
    create_agent_card_routes,
    create_jsonrpc_routes,
    create_rest_routes,
)
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Role,
    TaskState,
)


class Executor(AgentExecutor):
    def __init__(self, name):
        self.name = name

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        text = context.get_user_input()
        if text == "hang":
            await asyncio.sleep(30)
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
            followup = False
        else:
            followup = True
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.start_work()
        if followup:
            await updater.add_artifact([new_text_part(f"{self.name} got: {text}")])
            await updater.complete()
        elif text == "ask":
            await updater.requires_input(
                new_text_message(f"{self.name}: what else?", role=Role.ROLE_AGENT)
            )
        elif text == "die":
            await asyncio.sleep(0.3)
            os._exit(3)
        else:
            await updater.add_artifact([new_text_part(f"{self.name}: {text}")])
            await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        task = context.current_task
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.cancel()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--skill", default="echo")
    parser.add_argument("--extra-skills")
    parser.add_argument("--v03-only", action="store_true",
                        help="the card offers only a JSON-RPC interface of A2A 0.3")
    parser.add_argument("--rest-only", action="store_true",
                        help="the card offers only the HTTP+JSON interface; JSON-RPC is refused")
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    card = AgentCard(
        name=args.name,
        description="a stock a2a-sdk test agent",
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url=f"{base}/", protocol_binding="JSONRPC", protocol_version="0.3")
        ]
        if args.v03_only
        else [
            AgentInterface(url=f"{base}/rest", protocol_binding="HTTP+JSON", protocol_version="1.0")
        ]
        if args.rest_only
        else [
            AgentInterface(url=f"{base}/", protocol_binding="JSONRPC", protocol_version="1.0"),
            AgentInterface(url=f"{base}/rest", protocol_binding="HTTP+JSON", protocol_version="1.0"),
        ],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[
            AgentSkill(
                id=args.skill,
                name=args.skill,
                description="says what it was told, and who it is",
                tags=["test", "a2a"],
            )
        ],
    )
    handler = DefaultRequestHandler(
        agent_executor=Executor(args.name),
        task_store=InMemoryTaskStore(),
        agent_card=card,
    )
    async def with_extra_skills(card):
        if not args.extra_skills or not os.path.exists(args.extra_skills):
            return card
        changed = AgentCard()
        changed.CopyFrom(card)
        for line in open(args.extra_skills).read().split():
            changed.skills.append(
                AgentSkill(id=line, name=line, description="added later", tags=["test"])
            )
        return changed

    routes = (
        create_agent_card_routes(card, card_modifier=with_extra_skills)
        + create_jsonrpc_routes(handler, "/", enable_v0_3_compat=True)
        + create_rest_routes(handler, path_prefix="/rest")
    )
    app = Starlette(routes=routes)
    if args.v03_only:
        app.add_middleware(OnlyV03)
    if args.rest_only:
        app.add_middleware(OnlyRest)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


class OnlyRest(BaseHTTPMiddleware):
    """Refuses the JSON-RPC endpoint, as an agent offering only HTTP+JSON would."""

    async def dispatch(self, request, call_next):
        if request.method == "POST" and request.url.path == "/":
            return JSONResponse({"detail": "no JSON-RPC here"}, status_code=404)
        return await call_next(request)


class OnlyV03(BaseHTTPMiddleware):
    """Refuses every JSON-RPC method but v0.3's, as an agent of that version would."""

    async def dispatch(self, request, call_next):
        if request.method == "POST":
            try:
                method = json.loads(await request.body()).get("method", "")
            except (ValueError, AttributeError):
                method = ""
            if "/" not in method:
                return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {
                    "code": -32601, "message": f"v0.3 agent: no method {method!r}"}})
        return await call_next(request)


if __name__ == "__main__":
    main()
