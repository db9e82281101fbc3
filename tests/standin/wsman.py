"""The WSMan layer of the stand-in: SOAP envelopes in, SOAP envelopes out, PSRP via psrpcore.

One `WSManService` plays one Windows endpoint (a VMM server, a cluster node). It keeps a
`psrpcore.ServerRunspacePool` per shell, runs pipelines synchronously through a `Dispatcher`
(`tests.standin.dispatch`) and queues the resulting PSRP fragments per target (pool or
pipeline) until the client's Receive collects them. Follows windows-side.md §2.3: every answer
echoes `wsa:RelatesTo`, a ServerPipeline exists before its first fragment is fed, an empty
Receive is answered with the operation-timeout fault 0x80338029, and terminating errors fail the
pipeline through psrpcore's private `_change_state`.
"""

from __future__ import annotations

import base64
import threading
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import psrpcore
from psrpcore.types import PSInvocationState

from tests.standin import dispatch

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "wsa": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "wsman": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
    "wst": "http://schemas.xmlsoap.org/ws/2004/09/transfer",
    "pwsh": "http://schemas.microsoft.com/powershell",
    "wsmanfault": "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault",
}
for _prefix, _uri in NS.items():
    ET.register_namespace(_prefix, _uri)

ACTION = "http://schemas.xmlsoap.org/ws/2004/09/transfer/"
SHELL_ACTION = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/"
OPERATION_TIMEOUT = 0x80338029
UNEXPECTED_SELECTORS = 0x8033805B
DONE = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done"
RUNNING = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Running"
FINISHED = (PSInvocationState.Completed, PSInvocationState.Failed, PSInvocationState.Stopped)


class Fault(Exception):
    """A WSMan fault to return with HTTP 500."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Shell:
    """One runspace pool: psrpcore state, outgoing queues and the runspace's variables."""

    def __init__(self, shell_id: str, resource_uri: str) -> None:
        self.id = shell_id
        self.resource_uri = resource_uri
        self.pool = psrpcore.ServerRunspacePool()
        self.queues: dict[uuid.UUID | None, bytearray] = {}
        self.inputs: dict[uuid.UUID, list[Any]] = {}
        self.variables: dict[str, Any] = {}


class WSManService:
    """Answers WSMan requests for one endpoint; thread-safe (one lock around everything)."""

    def __init__(self, dispatcher: dispatch.Dispatcher, computer: str) -> None:
        self.dispatcher = dispatcher
        self.computer = computer
        self.shells: dict[str, Shell] = {}
        self._lock = threading.Lock()

    def handle(self, body: bytes) -> tuple[int, bytes]:
        """(HTTP status, response envelope) for one request envelope."""
        envelope = ET.fromstring(body)  # noqa: S314 - our own client, on loopback, in tests
        header = envelope.find("s:Header", NS)
        assert header is not None
        action = _text(header, "wsa:Action")
        message_id = _text(header, "wsa:MessageID")
        resource_uri = _text(header, "wsman:ResourceURI")
        selector = header.find("wsman:SelectorSet/wsman:Selector[@Name='ShellId']", NS)
        shell_id = selector.text if selector is not None and selector.text else ""
        body_el = envelope.find("s:Body", NS)
        assert body_el is not None
        try:
            with self._lock:
                out_action, payload = self._route(action, resource_uri, shell_id, body_el)
        except Fault as fault:
            return 500, _fault_envelope(message_id, fault, self.computer)
        return 200, _envelope(out_action, message_id, payload)

    def _route(
        self, action: str, uri: str, shell_id: str, body: ET.Element
    ) -> tuple[str, list[ET.Element]]:
        if action == ACTION + "Create":
            return ACTION + "CreateResponse", self._create(uri, body)
        shell = self.shells.get(shell_id)
        if shell is None:
            raise Fault(UNEXPECTED_SELECTORS, f"The shell {shell_id} was not found")
        if action == ACTION + "Delete":
            del self.shells[shell_id]
            return ACTION + "DeleteResponse", []
        if action == ACTION + "Get":
            state = ET.Element(f"{{{NS['rsp']}}}Shell")
            ET.SubElement(state, f"{{{NS['rsp']}}}State").text = "Connected"
            return ACTION + "GetResponse", [state]
        handlers = {
            "Command": self._command,
            "Send": self._send,
            "Receive": self._receive,
            "Signal": self._signal,
        }
        name = action.removeprefix(SHELL_ACTION)
        if name not in handlers:
            raise Fault(0x80338000, f"unsupported action {action}")
        return SHELL_ACTION + name + "Response", handlers[name](shell, body)

    # -- actions ---------------------------------------------------------------------------

    def _create(self, uri: str, body: ET.Element) -> list[ET.Element]:
        shell_el = body.find("rsp:Shell", NS)
        assert shell_el is not None
        shell_id = shell_el.attrib.get("ShellId") or str(uuid.uuid4()).upper()
        shell = Shell(shell_id, uri)
        self.shells[shell_id] = shell
        creation = shell_el.find("pwsh:creationXml", NS)
        assert creation is not None and creation.text
        self._feed(shell, base64.b64decode(creation.text), None)
        created = ET.Element(f"{{{NS['wst']}}}ResourceCreated")
        ET.SubElement(created, f"{{{NS['wsa']}}}Address").text = "http://localhost/wsman"
        params = ET.SubElement(created, f"{{{NS['wsa']}}}ReferenceParameters")
        ET.SubElement(params, f"{{{NS['wsman']}}}ResourceURI").text = uri
        selectors = ET.SubElement(params, f"{{{NS['wsman']}}}SelectorSet")
        sel = ET.SubElement(selectors, f"{{{NS['wsman']}}}Selector", Name="ShellId")
        sel.text = shell_id
        out_shell = ET.Element(f"{{{NS['rsp']}}}Shell")
        ET.SubElement(out_shell, f"{{{NS['rsp']}}}ShellId").text = shell_id
        ET.SubElement(out_shell, f"{{{NS['rsp']}}}ResourceUri").text = uri
        ET.SubElement(out_shell, f"{{{NS['rsp']}}}OutputStreams").text = "stdout"
        return [created, out_shell]

    def _command(self, shell: Shell, body: ET.Element) -> list[ET.Element]:
        line = body.find("rsp:CommandLine", NS)
        assert line is not None
        command_id = line.attrib.get("CommandId") or str(uuid.uuid4()).upper()
        pipeline_id = uuid.UUID(command_id)
        psrpcore.ServerPipeline(shell.pool, pipeline_id)
        argument = line.find("rsp:Arguments", NS)
        if argument is not None and argument.text:
            self._feed(shell, base64.b64decode(argument.text), pipeline_id)
        response = ET.Element(f"{{{NS['rsp']}}}CommandResponse")
        ET.SubElement(response, f"{{{NS['rsp']}}}CommandId").text = command_id
        return [response]

    def _send(self, shell: Shell, body: ET.Element) -> list[ET.Element]:
        for stream in body.findall("rsp:Send/rsp:Stream", NS):
            command_id = stream.attrib.get("CommandId")
            pipeline_id = uuid.UUID(command_id) if command_id else None
            self._feed(shell, base64.b64decode(stream.text or ""), pipeline_id)
        return [ET.Element(f"{{{NS['rsp']}}}SendResponse")]

    def _receive(self, shell: Shell, body: ET.Element) -> list[ET.Element]:
        desired = body.find("rsp:Receive/rsp:DesiredStream", NS)
        command_id = desired.attrib.get("CommandId") if desired is not None else None
        pipeline_id = uuid.UUID(command_id) if command_id else None
        data = bytes(shell.queues.pop(pipeline_id, b""))
        pipeline = shell.pool.pipeline_table.get(pipeline_id) if pipeline_id else None
        finished = pipeline is not None and pipeline.state in FINISHED
        if not data and not finished:
            raise Fault(
                OPERATION_TIMEOUT, "The WS-Management service cannot complete the operation"
            )
        response = ET.Element(f"{{{NS['rsp']}}}ReceiveResponse")
        stream = ET.SubElement(response, f"{{{NS['rsp']}}}Stream", Name="stdout")
        if command_id:
            stream.attrib["CommandId"] = command_id
        stream.text = base64.b64encode(data).decode()
        if command_id:
            state = ET.SubElement(response, f"{{{NS['rsp']}}}CommandState", CommandId=command_id)
            state.attrib["State"] = DONE if finished else RUNNING
        return [response]

    def _signal(self, shell: Shell, body: ET.Element) -> list[ET.Element]:
        signal = body.find("rsp:Signal", NS)
        assert signal is not None
        pipeline_id = uuid.UUID(signal.attrib["CommandId"])
        code = _text(signal, "rsp:Code")
        pipeline = shell.pool.pipeline_table.get(pipeline_id)
        if pipeline is not None:
            if code.endswith("ctrl_c") and pipeline.state == PSInvocationState.Running:
                pipeline.stop()
                self._drain(shell)
            elif code.endswith("Terminate"):
                shell.pool.pipeline_table.pop(pipeline_id, None)
                shell.queues.pop(pipeline_id, None)
        return [ET.Element(f"{{{NS['rsp']}}}SignalResponse")]

    # -- PSRP ------------------------------------------------------------------------------

    def _feed(self, shell: Shell, data: bytes, pipeline_id: uuid.UUID | None) -> None:
        payload = psrpcore.PSRPPayload(data, psrpcore.StreamType.default, pipeline_id)
        shell.pool.receive_data(payload)
        while (event := shell.pool.next_event()) is not None:
            self._on_event(shell, event)
        self._drain(shell)

    def _on_event(self, shell: Shell, event: Any) -> None:
        if isinstance(event, psrpcore.CreatePipelineEvent):
            shell.inputs[event.pipeline_id] = []
            if event.pipeline.no_input:
                self._run(shell, event.pipeline_id)
        elif isinstance(event, psrpcore.PipelineInputEvent):
            shell.inputs.setdefault(event.pipeline_id, []).append(event.data)
        elif isinstance(event, psrpcore.EndOfPipelineInputEvent):
            self._run(shell, event.pipeline_id)
        elif isinstance(event, psrpcore.SetMaxRunspacesEvent | psrpcore.SetMinRunspacesEvent):
            shell.pool.runspace_availability_response(event.ci, True)

    def _run(self, shell: Shell, pipeline_id: uuid.UUID) -> None:
        pipeline = shell.pool.pipeline_table[pipeline_id]
        commands = list(pipeline.metadata.commands)
        pipeline.start()
        output = dispatch.Output(pipeline)
        context = dispatch.Context(
            self.computer, shell.variables, shell.inputs.pop(pipeline_id, [])
        )
        try:
            self.dispatcher.run(commands, context, output)
        except (dispatch.DropConnection, dispatch.Unauthorized):
            raise
        except dispatch.Terminating as term:
            pipeline._change_state(PSInvocationState.Failed, term.record())
            return
        except Exception as exc:  # noqa: BLE001 - a stand-in bug becomes a visible error record
            failure = dispatch.Terminating(f"stand-in handler error: {exc!r}")
            pipeline._change_state(PSInvocationState.Failed, failure.record())
            return
        pipeline.complete()

    def _drain(self, shell: Shell) -> None:
        while (payload := shell.pool.data_to_send()) is not None:
            shell.queues.setdefault(payload.pipeline_id, bytearray()).extend(payload.data)


def _text(parent: ET.Element, path: str) -> str:
    found = parent.find(path, NS)
    return (found.text or "") if found is not None else ""


def _envelope(action: str, relates_to: str, body: list[ET.Element]) -> bytes:
    env = ET.Element(f"{{{NS['s']}}}Envelope")
    header = ET.SubElement(env, f"{{{NS['s']}}}Header")
    ET.SubElement(header, f"{{{NS['wsa']}}}Action").text = action
    ET.SubElement(header, f"{{{NS['wsa']}}}MessageID").text = f"uuid:{uuid.uuid4()}"
    ET.SubElement(header, f"{{{NS['wsa']}}}RelatesTo").text = relates_to
    body_el = ET.SubElement(env, f"{{{NS['s']}}}Body")
    body_el.extend(body)
    return ET.tostring(env, encoding="utf-8")


def _fault_envelope(relates_to: str, fault: Fault, machine: str) -> bytes:
    s, wf = NS["s"], NS["wsmanfault"]
    el = ET.Element(f"{{{s}}}Fault")
    code = ET.SubElement(el, f"{{{s}}}Code")
    ET.SubElement(code, f"{{{s}}}Value").text = "s:Receiver"
    reason = ET.SubElement(el, f"{{{s}}}Reason")
    ET.SubElement(reason, f"{{{s}}}Text").text = fault.reason
    detail = ET.SubElement(el, f"{{{s}}}Detail")
    wsman_fault = ET.SubElement(
        detail, f"{{{wf}}}WSManFault", Code=str(fault.code), Machine=machine
    )
    ET.SubElement(wsman_fault, f"{{{wf}}}Message").text = fault.reason
    return _envelope("http://schemas.dmtf.org/wbem/wsman/1/wsman/fault", relates_to, [el])
