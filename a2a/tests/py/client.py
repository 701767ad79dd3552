"""Stock a2a-sdk 1.3.0 clients against the DMSC front door: the conformance matrix and the
error mappings. Prints one "ok ..." line per check; exits 1 at the first failure.

Usage:
  python3 client.py matrix --front URL --cap CAP --agent NAME   # {JSON-RPC 1.0, HTTP+JSON 1.0,
                                                                 #  JSON-RPC 0.3} x {stream, not}
  python3 client.py errors --front URL --cap CAP                # error mappings, raw HTTP
  python3 client.py native --front URL --cap CAP                # a native dmsc/1 agent answers
  python3 client.py affinity --front URL --cap CAP --agents A,B # follow-ups reach the task's agent
  python3 client.py die --front URL --cap CAP                   # the agent dies mid-stream
  python3 client.py send --front URL --cap CAP --text T         # one message, prints the text
      (any command: --cert C --key K --ca CA for HTTPS with a client certificate)
"""

import argparse
import asyncio
import ssl
import sys
import uuid

import httpx
from google.protobuf.json_format import ParseDict

from a2a.client import ClientConfig, create_client
from a2a.client.card_resolver import parse_agent_card
from a2a.helpers import new_text_message
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    SubscribeToTaskRequest,
    TaskState,
)

V1 = {"a2a-version": "1.0"}


def fail(what):
    print(f"FAIL {what}", flush=True)
    sys.exit(1)


def check(cond, what):
    if not cond:
        fail(what)
    print(f"ok {what}", flush=True)


TLS = {}


def http_client(**kw):
    """An httpx client, with the client certificate and CA of --cert/--key/--ca if given."""
    if TLS.get("ca"):
        context = ssl.create_default_context(cafile=TLS["ca"])
        if TLS.get("cert"):
            context.load_cert_chain(TLS["cert"], TLS["key"])
        kw.update(verify=context)
    return httpx.AsyncClient(**kw)


async def client_for(front, cap, binding, streaming):
    url = f"{front}/a2a/c/{cap}"
    http = http_client(timeout=30)
    if binding == "jsonrpc-1.0":
        # The ordinary card-driven path: the client reads the card and picks an interface.
        return await create_client(
            url, client_config=ClientConfig(streaming=streaming, httpx_client=http)
        )
    if binding == "rest-1.0":
        return await create_client(
            url,
            client_config=ClientConfig(
                streaming=streaming,
                supported_protocol_bindings=["HTTP+JSON"],
                httpx_client=http,
            ),
        )
    # v0.3: the same card with only its v0.3 interface, as an older client would see it.
    data = (await http.get(f"{url}/.well-known/agent-card.json", headers=V1)).json()
    data["supportedInterfaces"] = [
        i for i in data["supportedInterfaces"] if i.get("protocolVersion") == "0.3"
    ]
    card = parse_agent_card(data)
    return await create_client(
        card, client_config=ClientConfig(streaming=streaming, httpx_client=http)
    )


def texts(events):
    """Every text part of every artifact and message in the events."""
    out = []
    for ev in events:
        for which in ("task", "artifact_update", "message", "status_update"):
            if not ev.HasField(which):
                continue
            obj = getattr(ev, which)
            if which == "task":
                for a in obj.artifacts:
                    out += [p.text for p in a.parts if p.text]
            elif which == "artifact_update":
                out += [p.text for p in obj.artifact.parts if p.text]
            elif which == "message":
                out += [p.text for p in obj.parts if p.text]
    return out


def final_state(events):
    state, task_id, context_id = None, None, None
    for ev in events:
        if ev.HasField("task"):
            state, task_id, context_id = ev.task.status.state, ev.task.id, ev.task.context_id
        elif ev.HasField("status_update"):
            state = ev.status_update.status.state
            task_id, context_id = ev.status_update.task_id, ev.status_update.context_id
    return state, task_id, context_id


async def send(client, text, task_id=None, context_id=None):
    message = new_text_message(text, role=Role.ROLE_USER)
    if task_id:
        message.task_id = task_id
    if context_id:
        message.context_id = context_id
    return [ev async for ev in client.send_message(SendMessageRequest(message=message))]


async def matrix(args):
    for binding in ("jsonrpc-1.0", "rest-1.0", "jsonrpc-0.3"):
        for streaming in (False, True):
            case = f"{binding} streaming={streaming}"
            client = await client_for(args.front, args.cap, binding, streaming)
            events = await send(client, "hello")
            check(f"{args.agent}: hello" in texts(events), f"{case}: answer {texts(events)}")
            state, _, _ = final_state(events)
            check(state == TaskState.TASK_STATE_COMPLETED, f"{case}: completed")
            if streaming:
                check(len(events) >= 3, f"{case}: {len(events)} events streamed")
            # A multi-turn task: the follow-up carries the task id.
            events = await send(client, "ask")
            state, task_id, context_id = final_state(events)
            check(state == TaskState.TASK_STATE_INPUT_REQUIRED, f"{case}: input required")
            events = await send(client, "more", task_id, context_id)
            check(f"{args.agent} got: more" in texts(events), f"{case}: follow-up answered")
            task = await client.get_task(GetTaskRequest(id=task_id))
            check(task.status.state == TaskState.TASK_STATE_COMPLETED, f"{case}: GetTask")
            events = await send(client, "ask")
            _, task_id, _ = final_state(events)
            task = await client.cancel_task(CancelTaskRequest(id=task_id))
            check(task.status.state == TaskState.TASK_STATE_CANCELED, f"{case}: CancelTask")
            try:
                await client.get_task(GetTaskRequest(id="no-such-task"))
                fail(f"{case}: unknown task found")
            except Exception as e:  # the SDK's TaskNotFoundError, whatever the binding
                check("TaskNotFound" in type(e).__name__, f"{case}: {type(e).__name__}")
            await client.close()


async def errors(args):
    base = f"{args.front}/a2a/c"
    rpc = lambda method, params=None, id=1: {
        "jsonrpc": "2.0", "id": id, "method": method, "params": params or {}
    }
    msg = {"message": {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "x"}]}}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(f"{args.front}/.well-known/api-catalog")
        hrefs = [i["href"] for i in r.json()["linkset"][0]["item"]]
        check(
            r.headers["content-type"] == "application/linkset+json"
            and f"{base}/{args.cap}/.well-known/agent-card.json" in hrefs,
            f"catalog lists {args.cap}",
        )
        check(not any("dmsc.a2a.front" in h for h in hrefs), "catalog hides the front doors")
        r = await http.get(f"{base}/{args.cap}/.well-known/agent-card.json")
        etag = r.headers["etag"]
        r2 = await http.get(
            f"{base}/{args.cap}/.well-known/agent-card.json", headers={"if-none-match": etag}
        )
        check(r2.status_code == 304, "card ETag: 304 when unchanged")
        card = r.json()
        check(card["url"] == f"{base}/{args.cap}" and card["protocolVersion"].startswith("0.3"),
              "card carries the v0.3 fields pointing at the front door")

        async def rpc_error(body, code, what, headers=V1, path=args.cap):
            r = await http.post(f"{base}/{path}", json=body, headers=headers)
            err = r.json().get("error", {})
            check(err.get("code") == code, f"{what}: {code} ({err.get('message')})")

        await rpc_error(rpc("SendMessage", msg), -32060, "nobody offers it", path="nobody")
        r = await http.get(f"{base}/nobody/.well-known/agent-card.json")
        check(r.status_code == 404, "no card for a capability nobody offers")
        await rpc_error(rpc("SendMessage", msg), -32009, "v1.0 method without A2A-Version", headers={})
        await rpc_error(rpc("SendMessage", msg), -32009, "A2A-Version 2.0", headers={"a2a-version": "2.0"})
        await rpc_error(rpc("tasks/explode"), -32601, "unknown method")
        await rpc_error({"id": 1, "method": "SendMessage"}, -32600, "no jsonrpc member")
        await rpc_error(rpc("SendMessage", {**msg, "tenant": "other"}), -32602, "tenant disagrees with the path")
        await rpc_error(rpc("message/send", {"message": {"role": "robot", "parts": []}}), -32602, "bad v0.3 params")
        await rpc_error(rpc("CreateTaskPushNotificationConfig", {"taskId": "t"}), -32003, "push notifications")
        await rpc_error(rpc("GetExtendedAgentCard"), -32007, "extended card")
        r = await http.post(f"{base}/{args.cap}", content=b"{not json", headers=V1)
        check(r.json()["error"]["code"] == -32700, "malformed JSON: -32700")
        r = await http.post(f"{base}/{args.cap}", content=b"x" * ((1 << 20) + 1024), headers=V1)
        check(r.status_code == 413, "body over the limit: 413")
        r = await http.post(f"{base}/nobody/rest/message:send", json=msg, headers=V1)
        body = r.json()["error"]
        check(r.status_code == 404 and body["details"][0]["reason"] == "CAPABILITY_NOT_FOUND",
              "HTTP+JSON: nobody offers it is 404 CAPABILITY_NOT_FOUND")
        r = await http.post(f"{base}/{args.cap}/rest/message:send", json=msg)
        check(r.status_code == 400 and r.json()["error"]["details"][0]["reason"] == "VERSION_NOT_SUPPORTED",
              "HTTP+JSON without A2A-Version: 400 VERSION_NOT_SUPPORTED")
        r = await http.post(f"{base}/{args.cap}/rest/other/message:send", json=msg, headers=V1)
        check(r.status_code == 400, "HTTP+JSON: tenant disagrees with the path")
        r = await http.get(f"{base}/{args.cap}/rest/nowhere", headers=V1)
        check(r.status_code == 404, "HTTP+JSON: unknown route 404")
        if args.denied:
            await rpc_error(rpc("SendMessage", msg), -32061, "policy denies the caller", path=args.denied)
            r = await http.post(f"{base}/{args.denied}/rest/message:send", json=msg, headers=V1)
            check(r.status_code == 403, "HTTP+JSON: policy denial is 403")


async def native(args):
    client = await client_for(args.front, args.cap, "jsonrpc-1.0", False)
    events = await send(client, "hi")
    check(texts(events) == ["native: hi"], f"a native dmsc/1 agent answered {texts(events)}")
    client = await client_for(args.front, args.cap, "jsonrpc-0.3", True)
    events = await send(client, "hi")
    check(texts(events) == ["native: hi"], f"... and a v0.3 streaming caller {texts(events)}")


def status_text(events):
    for ev in events:
        if ev.HasField("task") and ev.task.status.HasField("message"):
            return [p.text for p in ev.task.status.message.parts]
        if ev.HasField("status_update") and ev.status_update.status.HasField("message"):
            return [p.text for p in ev.status_update.status.message.parts]
    return []


async def first_event(client, task_id):
    async for event in client.subscribe(SubscribeToTaskRequest(id=task_id)):
        return event
    fail(f"SubscribeToTask of {task_id}: no event")


async def affinity(args):
    agents = args.agents.split(",")
    seen = set()
    for binding in ("jsonrpc-1.0", "rest-1.0", "jsonrpc-0.3"):
        for streaming in (False, True):
            client = await client_for(args.front, args.cap, binding, streaming)
            for _ in range(4):
                events = await send(client, "ask")
                state, task_id, context_id = final_state(events)
                holder = [a for a in agents if f"{a}: what else?" in status_text(events)]
                if state != TaskState.TASK_STATE_INPUT_REQUIRED or len(holder) != 1:
                    fail(f"{binding}: ask answered {status_text(events)}")
                holder = holder[0]
                seen.add(holder)
                task = await client.get_task(GetTaskRequest(id=task_id))
                if task.status.state != TaskState.TASK_STATE_INPUT_REQUIRED:
                    fail(f"{binding}: GetTask of {task_id} reached the wrong agent")
                # Resubscribing (a streaming client's) streams the task from the agent
                # holding it; the first event is enough.
                if streaming:
                    first = await asyncio.wait_for(first_event(client, task_id), 10)
                    if first.task.id != task_id:
                        fail(f"{binding}: SubscribeToTask of {task_id} answered {first}")
                events = await send(client, "more", task_id, context_id)
                if f"{holder} got: more" not in texts(events):
                    fail(f"{binding}: follow-up to {holder}'s task answered {texts(events)}")
            check(True, f"{binding} streaming={streaming}: 4 tasks followed up at their agent")
            await client.close()
    check(seen == set(agents), f"tasks were spread over {sorted(seen)}")


async def die(args):
    client = await client_for(args.front, args.cap, "jsonrpc-1.0", True)
    try:
        events = await asyncio.wait_for(send(client, "die"), 30)
        fail(f"a dying agent's stream ended without an error: {events}")
    except asyncio.TimeoutError:
        fail("a dying agent's stream hung")
    except Exception as e:
        check(True, f"the stream ended with an error: {type(e).__name__}: {e}")


async def send_one(args):
    """Sends --count messages (at once with --parallel), printing one line per answer."""

    async def one():
        try:
            client = await client_for(args.front, args.cap, "jsonrpc-1.0", False)
            events = await send(client, args.text)
            return "text " + " ".join(texts(events))
        except Exception as e:
            return f"error {type(e).__name__} {e}".replace("\n", " ")

    if args.parallel:
        answers = await asyncio.gather(*(one() for _ in range(args.count)))
    else:
        answers = [await one() for _ in range(args.count)]
    for answer in answers:
        print(answer, flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["matrix", "errors", "native", "affinity", "die", "send"])
    p.add_argument("--front", required=True)
    p.add_argument("--cap", required=True)
    p.add_argument("--agent", default="")
    p.add_argument("--agents", default="")
    p.add_argument("--denied", default="")
    p.add_argument("--text", default="hello")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--parallel", action="store_true")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--ca")
    args = p.parse_args()
    TLS.update(cert=args.cert, key=args.key, ca=args.ca)
    run = {
        "matrix": matrix,
        "errors": errors,
        "native": native,
        "affinity": affinity,
        "die": die,
        "send": send_one,
    }
    asyncio.run(run[args.what](args))


if __name__ == "__main__":
    main()
