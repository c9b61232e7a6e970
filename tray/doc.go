// Package tray is cloudprotect's status icon: a thin client of the agent's
// local API that shows cloud protection status at a glance, keeps recent
// detections in view until the person has seen them, lets the person
// participate in the Security Network or leave it after a Yes/No
// confirmation, tells them by desktop notification when something changed,
// and starts at login. One tray runs per session (it owns BusName).
//
// The menu model (Build) is a pure function of what the agent reports,
// in the person's language (package i18n); the App loop follows the
// agent's event stream and turns clicks into agent calls; the systray
// layer in systray.go is the only code that imports fyne.io/systray, and
// SystrayPNG makes the panel receive the icons exactly as drawn.
package tray
