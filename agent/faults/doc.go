// Package faults attacks the whole system the way its worst day would:
// the real cloudprotectd binary killed at random points of an exec storm,
// a full disk under its state folder, hostile files and hostile local
// clients, a hostile server and consent withdrawn at the worst moment.
// Each case asserts that nothing is lost or leaked.
//
// The package holds only tests. `make faults` runs them in a bounded form
// that fits CI; CLOUDPROTECT_FAULTS=full runs the long form (more kills,
// more loops). Most cases need root (fanotify, tmpfs, other uids): they
// skip on a laptop and fail under CI=true when root is missing.
package faults
