package cloud

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/internal/atomicfile"
	"github.com/cloudprotect/cloudprotect/wire"
)

// stateVersion is the format of the state file.
const stateVersion = 1

// maxDeletions bounds the deletion requests kept; beyond it the oldest is
// given up (with an error in the log). Each one is a person leaving while
// the server could not be reached, so the bound is never met in practice.
const maxDeletions = 64

// Credentials identify one installation on one server.
type Credentials struct {
	InstallationID string `json:"installation_id"`
	Token          string `json:"token"`
	Server         string `json:"server"`
}

func (c Credentials) valid() bool {
	if checkRegistration(wire.Registration{InstallationID: c.InstallationID, Token: c.Token}) != nil {
		return false
	}
	// The laxer user-mode rules: whether the current mode may use this
	// server is decided when a request is made.
	_, _, err := ParseServerURL(c.Server, false)
	return err == nil
}

// Deletion is a deletion request waiting for the server's confirmation.
type Deletion struct {
	Credentials
	Requested time.Time `json:"requested"`
}

// state is the Installation's state file, "upload.json" beside the
// agent's other state. It also keeps the uploader's counters (Totals).
//
// # On disk
//
// One JSON object, mode 0600 (it holds bearer tokens), replaced as a
// whole by atomicfile.Write (temporary file, fsync, rename, fsync of the
// folder):
//
//	version          1
//	installation     the current registration {installation_id, token,
//	                 server}, absent until the first registration and after
//	                 leaving
//	deletions        deletion requests not yet confirmed, oldest first
//	last_upload      when a batch was last accepted
//	records_sent     records the server accepted, ever
//	batches_dropped  batches the server refused for good, ever
//	records_refused  records the server refused for good, ever (each
//	                 alone, once smaller batches singled it out)
//
// Invariants: every credential has a valid installation ID, a token and
// a server URL NewClient accepts; an installation ID appears at most once
// across installation and deletions. Leave writes the file before it
// returns, so a deletion request survives a crash right after it.
//
// # What a torn write can break, and how loading repairs it
//
// atomicfile.Write never leaves a torn file: after a crash the file holds
// the old or the new content, and a stray temporary file is ignored. A
// file damaged otherwise (not JSON, another version) is renamed to
// "upload.json.corrupt-<UTC time>" with an error in the log, and the
// agent starts afresh: it registers a new installation when the person
// participates. Deletion requests in such a file cannot be recovered;
// the renamed file keeps them for an administrator. Invalid entries in an
// otherwise readable file are dropped one by one with a warning.
type state struct {
	Version      int          `json:"version"`
	Installation *Credentials `json:"installation,omitempty"`
	Deletions    []Deletion   `json:"deletions,omitempty"`
	Totals
}

// Totals are the uploader's counters, kept in the state file.
type Totals struct {
	// LastUpload is when a batch was last accepted.
	LastUpload *time.Time `json:"last_upload,omitempty"`
	// RecordsSent are the records the server accepted, ever.
	RecordsSent uint64 `json:"records_sent"`
	// BatchesDropped are the batches the server refused for good, ever.
	BatchesDropped uint64 `json:"batches_dropped"`
	// RecordsRefused are the records the server refused for good, ever.
	RecordsRefused uint64 `json:"records_refused,omitempty"`
}

// loadState reads the state file. problems lists what was repaired, for
// the log; a missing file is an empty state.
func loadState(path string, now time.Time) (st state, problems []string, err error) {
	st.Version = stateVersion
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return st, nil, nil
	}
	if err != nil {
		return st, nil, fmt.Errorf("read upload state: %w", err)
	}
	var got state
	if err := json.Unmarshal(data, &got); err != nil || got.Version != stateVersion {
		why := "not a version 1 state file"
		if err != nil {
			why = err.Error()
		}
		aside := fmt.Sprintf("%s.corrupt-%s", path, now.UTC().Format("20060102T150405Z"))
		if rerr := os.Rename(path, aside); rerr != nil {
			return st, nil, fmt.Errorf("move damaged upload state aside: %w", rerr)
		}
		return st, []string{fmt.Sprintf("upload state was damaged (%s): moved to %s; a new installation will be registered", why, aside)}, nil
	}
	seen := map[string]bool{}
	if in := got.Installation; in != nil {
		if in.valid() {
			st.Installation = in
			seen[in.InstallationID] = true
		} else {
			problems = append(problems, "dropped an invalid installation record")
		}
	}
	for _, d := range got.Deletions {
		if !d.valid() || seen[d.InstallationID] {
			problems = append(problems, "dropped an invalid or repeated deletion request")
			continue
		}
		seen[d.InstallationID] = true
		st.Deletions = append(st.Deletions, d)
	}
	st.Totals = got.Totals
	return st, problems, nil
}

func (st *state) save(path string) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("save upload state: %w", err)
	}
	if err := atomicfile.Write(path, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("save upload state: %w", err)
	}
	return nil
}
