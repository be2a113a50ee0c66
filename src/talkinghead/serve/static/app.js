// talkinghead live page: WebRTC with the server (no libraries, no build step).
"use strict";
const $ = (id) => document.getElementById(id);
let pc = null, session = null, statsTimer = null;

function status(msg, isError) {
  $("status").textContent = msg;
  $("status").className = isError ? "error" : "";
}

async function api(method, path, body, headers) {
  const res = await fetch(path, { method, body, headers });
  const data = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

async function loadAvatars() {
  const avatars = await api("GET", "/api/avatars");
  $("avatar").innerHTML = "";
  for (const a of avatars) {
    const o = document.createElement("option");
    o.value = a.name;
    o.textContent = `${a.name} (${a.method}, ${a.size}px, ${a.fps} fps)`;
    $("avatar").appendChild(o);
  }
}

function iceComplete(conn) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => { if (conn.iceGatheringState === "complete") { conn.removeEventListener("icegatheringstatechange", check); resolve(); } };
    conn.addEventListener("icegatheringstatechange", check);
  });
}

async function connect() {
  status("connecting...");
  pc = new RTCPeerConnection({ iceServers: [] });
  const remote = new MediaStream();
  $("video").srcObject = remote;
  pc.addEventListener("track", (ev) => remote.addTrack(ev.track));
  pc.addTransceiver("video", { direction: "recvonly" });
  if ($("mic").checked) {
    const mic = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
    pc.addTransceiver(mic.getAudioTracks()[0], { direction: "sendrecv" });
  } else {
    pc.addTransceiver("audio", { direction: "recvonly" });
  }
  await pc.setLocalDescription(await pc.createOffer());
  await iceComplete(pc);
  const answer = await api("POST", "/api/sessions", JSON.stringify({
    avatar: $("avatar").value, sdp: pc.localDescription.sdp, type: pc.localDescription.type,
  }), { "Content-Type": "application/json" });
  session = answer.session;
  await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
  for (const id of ["upload", "say", "disconnect"]) $(id).disabled = false;
  $("connect").disabled = true;
  status(`session ${session}: connected`);
  statsTimer = setInterval(showStats, 1000);
}

async function disconnect() {
  clearInterval(statsTimer);
  if (session) await api("DELETE", `/api/sessions/${session}`).catch(() => {});
  if (pc) pc.close();
  pc = null; session = null;
  for (const id of ["upload", "say", "disconnect"]) $(id).disabled = true;
  $("connect").disabled = false;
  status("disconnected");
}

async function showStats() {
  if (!session) return;
  try { $("stats").textContent = JSON.stringify(await api("GET", `/api/sessions/${session}/stats`), null, 1); }
  catch (e) { status(e.message, true); }
}

async function speak(body, headers) {
  const r = await api("POST", `/api/sessions/${session}/speech`, body, headers);
  status(`speaking utterance ${r.utterance} (${r.duration_s} s)`);
}

$("connect").onclick = () => connect().catch((e) => status(e.message, true));
$("disconnect").onclick = () => disconnect();
$("upload").onclick = () => {
  const f = $("file").files[0];
  if (!f) return status("choose an audio file first", true);
  speak(f, { "Content-Type": f.type || "application/octet-stream" }).catch((e) => status(e.message, true));
};
$("say").onclick = () => speak(JSON.stringify({ text: $("text").value }), { "Content-Type": "application/json" })
  .catch((e) => status(e.message, true));
loadAvatars().catch((e) => status(e.message, true));
