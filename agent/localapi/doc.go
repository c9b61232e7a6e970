// Package localapi is the agent's local API: HTTP and JSON over a unix
// socket, with the caller's identity taken from SO_PEERCRED. It holds the
// server the agent runs, the client the CLI and the tray use, and the
// messages they exchange.
package localapi
