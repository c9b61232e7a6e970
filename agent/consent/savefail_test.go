package consent

import (
	"errors"
	"io/fs"
	"path/filepath"
	"syscall"
	"testing"
)

// When the record cannot be written (a full disk), joining fails and
// changes nothing, but leaving takes effect at once and survives a
// restart: the record is removed, and a missing record collects nothing.
func TestLeaveWhenRecordCannotBeSaved(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	m := open(t, dir, 1)
	if _, err := m.Set(true, 1, ViaCLI, 0); err != nil {
		t.Fatal(err)
	}
	full := func(string, []byte, fs.FileMode) error { return syscall.ENOSPC }
	m.store.write = full

	tests := []struct {
		name           string
		participate    bool
		wantErr        bool
		wantCollecting bool
		wantNotice     bool
	}{
		{"joining again fails and keeps the state", true, true, true, false},
		{"leaving applies", false, false, false, true},
		{"joining after that fails", true, true, false, true},
	}
	for _, tt := range tests {
		v, err := m.Set(tt.participate, 1, ViaCLI, 0)
		if (err != nil) != tt.wantErr || (err != nil && !errors.Is(err, ErrSave)) {
			t.Fatalf("%s: err = %v", tt.name, err)
		}
		if v.Collecting != tt.wantCollecting || (v.Notice != "") != tt.wantNotice {
			t.Fatalf("%s: view = %+v", tt.name, v)
		}
	}
	again := open(t, dir, 1).View()
	if again.Collecting || again.State != Undecided {
		t.Fatalf("after a restart: %+v, want undecided and not collecting", again)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, "consent.json*")); len(m) != 0 {
		t.Fatalf("files left: %v", m)
	}
}
