// Package localapi is the agent's local API: HTTP and JSON over a unix
// socket. The caller's identity (uid, gid, supplementary groups) is what
// the kernel recorded when it connected (SO_PEERCRED, SO_PEERGROUPS) and
// is never looked up again. Privileged callers (root, the administrators'
// group, the owner of a user-mode agent) change participation and read
// what was collected; everyone reads the status. Connections are capped
// per uid with room kept for every account, each write to a client has a
// deadline, and large answers are streamed one at a time, so no client
// can make the agent's memory grow. The package holds the server the
// agent runs, the client the CLI and the tray use, and the event hub.
package localapi
