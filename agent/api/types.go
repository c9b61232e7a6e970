// Package api holds the messages of the agent's local API: the status, the
// statement, participation requests, queue previews, upload results, alerts
// and events. The agent's components, the local API server and its clients
// (CLI, tray) share these types; the package imports nothing of theirs.
package api

import (
	"time"

	"github.com/cloudprotect/cloudprotect/wire"
)

// Status is the answer to GET /v1/status and the payload of "status" events.
type Status struct {
	Participation Participation `json:"participation"`
	Agent         AgentInfo     `json:"agent"`
	Queue         QueueInfo     `json:"queue"`
	Upload        UploadInfo    `json:"upload"`
	// Protection is blocking at exec; Alerts counts the recent alerts the
	// caller may see.
	Protection ProtectionInfo `json:"protection"`
	Alerts     int            `json:"alerts"`
	// CanChange reports whether the caller who asked may change
	// participation (root, the admin group, or the owner in user mode).
	CanChange bool `json:"can_change"`
}

// Participation is the consent part of the status.
type Participation struct {
	// State is StateUndecided, StateParticipating or StateDeclined.
	State State `json:"state"`
	// StatementVersion is the version of the statement this agent ships.
	StatementVersion int `json:"statement_version"`
	// AcceptedVersion is the statement version the person accepted (0 if none).
	AcceptedVersion int `json:"accepted_version"`
	// Paused is true when the person participates but accepted an older
	// statement: nothing is collected until they accept the current one.
	Paused bool `json:"paused"`
	// Collecting is true when exec sources run and statistics are queued.
	Collecting bool `json:"collecting"`
	// Locked is true when the administrator's policy forces the state.
	Locked bool `json:"locked"`
	// Policy is the policy file's path when Locked, or when it failed to load.
	Policy string `json:"policy,omitempty"`
	// PolicyError says why the policy file was ignored, if it was.
	PolicyError string `json:"policy_error,omitempty"`
	// Via is how the current state was chosen: install, cli, tray, policy.
	Via string `json:"via,omitempty"`
	// Since is when the current state was chosen.
	Since *time.Time `json:"since,omitempty"`
	// Notice tells the person about something that happened to their
	// consent record (for example a corrupt state file set aside).
	Notice string `json:"notice,omitempty"`
}

// State is where a person stands with the Security Network.
type State string

// Participation states.
const (
	// StateUndecided: never asked, or never answered; nothing is collected.
	StateUndecided State = "undecided"
	// StateParticipating: agreed; collecting unless Paused.
	StateParticipating State = "participating"
	// StateDeclined: said no, or left; nothing is collected.
	StateDeclined State = "declined"
)

// AgentInfo describes the running agent.
type AgentInfo struct {
	Version string `json:"version"`
	// Mode is "system" or "user".
	Mode string `json:"mode"`
	// ExecSource is the exec source in use ("fanotify", ...), or "" while
	// nothing is collected.
	ExecSource string `json:"exec_source"`
	// Limited is true when the agent sees less than it should, and
	// LimitedReason says why.
	Limited       bool      `json:"limited"`
	LimitedReason string    `json:"limited_reason,omitempty"`
	Started       time.Time `json:"started"`
	// EventsSeen counts the executions (and loaded files) the exec
	// sources reported since the agent started.
	EventsSeen uint64 `json:"events_seen"`
	// EventsLost counts executions the kernel or the agent dropped
	// because the agent fell behind.
	EventsLost uint64 `json:"events_lost"`
	// EventsMissed counts executions the kernel announced (process
	// events) that fanotify did not report and that ended before the
	// agent could identify them: programs run from memory or from a
	// filesystem of another mount namespace.
	EventsMissed uint64 `json:"events_missed"`
	// EventsUnidentified counts executions whose file could not be
	// identified (changing while read, unreadable, too large).
	EventsUnidentified uint64 `json:"events_unidentified"`
}

// QueueInfo describes the local statistics queue.
type QueueInfo struct {
	// Pending is the number of programs (one record each) with something
	// waiting to be sent.
	Pending int `json:"pending"`
	// Executions is the number of executions waiting to be sent, over
	// all programs.
	Executions uint64 `json:"executions"`
	// Batch and BatchExecutions are the programs and executions of the
	// batch cut for the cloud and waiting for its answer; they are part
	// of Pending and Executions. Zero when no batch is waiting.
	Batch           int    `json:"batch"`
	BatchExecutions uint64 `json:"batch_executions"`
	// Records is the number of records kept (pending or sent).
	Records int `json:"records"`
	// Evicted counts records dropped because the queue was full.
	Evicted uint64 `json:"evicted"`
	// Bytes is the size of the queue on disk.
	Bytes int64 `json:"bytes"`
}

// UploadInfo describes the connection to the Security Network cloud.
type UploadInfo struct {
	Server         string     `json:"server"`
	Registered     bool       `json:"registered"`
	LastUpload     *time.Time `json:"last_upload,omitempty"`
	LastError      string     `json:"last_error,omitempty"`
	NextAttempt    *time.Time `json:"next_attempt,omitempty"`
	RecordsSent    uint64     `json:"records_sent"`
	BatchesDropped uint64     `json:"batches_dropped"`
	// RecordsRefused counts records the server refused for good: each
	// was dropped alone, once smaller batches singled it out.
	RecordsRefused uint64 `json:"records_refused"`
	// DeletionPending is true while a deletion request waits for the
	// server's confirmation.
	DeletionPending bool `json:"deletion_pending"`
	// Problem says why nothing is sent (no server configured, or one
	// that is not used), and ProblemHint what to do about it.
	Problem     string `json:"problem,omitempty"`
	ProblemHint string `json:"problem_hint,omitempty"`
}

// Statement is the answer to GET /v1/statement.
type Statement struct {
	Version int `json:"version"`
	// Lang is the language of Title, Summary and Text ("en", "de", …);
	// every translation carries the same Version.
	Lang    string `json:"lang,omitempty"`
	Title   string `json:"title"`
	Summary string `json:"summary"`
	Text    string `json:"text"`
}

// ParticipationRequest is the body of PUT /v1/participation.
type ParticipationRequest struct {
	Participate bool `json:"participate"`
	// StatementVersion is the version of the statement the person was
	// shown; required to participate.
	StatementVersion int `json:"statement_version"`
	// Via is "cli", "tray" or "install".
	Via string `json:"via"`
}

// QueuePreview is the answer to GET /v1/queue: every record waiting to be
// sent, as the cloud would receive it. First come the records of the
// batch cut for the cloud and waiting for its answer (InBatch: it is sent
// again as it is until the cloud confirms it), then every other record
// with what is waiting beyond that batch, oldest first; a program may
// appear in both. The agent streams it: Records may be long.
type QueuePreview struct {
	Records []QueueRecord `json:"records,omitempty"`
	// BatchID is the ID of the batch waiting, "" when none is cut.
	BatchID string `json:"batch_id,omitempty"`
	// StatementVersion is the statement version the records are sent
	// under.
	StatementVersion int `json:"statement_version"`
	// Totals sum up Records.
	Totals QueueTotals `json:"totals"`
}

// QueueRecord is one record of a QueuePreview.
type QueueRecord struct {
	wire.Record
	// InBatch marks a record of the batch waiting for the cloud's answer.
	InBatch bool `json:"in_batch,omitempty"`
}

// QueueTotals sum up a QueuePreview's records.
type QueueTotals struct {
	// Programs counts the distinct programs listed (one in the batch and
	// after it counts once); Executions the executions waiting.
	Programs   int    `json:"programs"`
	Executions uint64 `json:"executions"`
	// Records counts the records listed; BatchRecords and
	// BatchExecutions those of the batch waiting.
	Records         int    `json:"records"`
	BatchRecords    int    `json:"batch_records"`
	BatchExecutions uint64 `json:"batch_executions"`
}

// UploadResult is the answer to POST /v1/upload.
type UploadResult struct {
	// Sent is the number of records the server accepted.
	Sent int `json:"sent"`
	// Refused is the number of records the server refused for good
	// (dropped, each alone); RefusedReason is the server's reason for the
	// last one.
	Refused       int    `json:"refused"`
	RefusedReason string `json:"refused_reason,omitempty"`
	// Pending is the number of records still waiting.
	Pending int    `json:"pending"`
	Message string `json:"message"`
}

// Event types on GET /v1/events.
const (
	EventStatus = "status"
	EventAlert  = "alert"
)

// Event is one line of the GET /v1/events stream (newline-delimited JSON).
// The first event on a new stream is always the current status.
type Event struct {
	Type   string    `json:"type"`
	Time   time.Time `json:"time"`
	Status *Status   `json:"status,omitempty"`
	Alert  *Alert    `json:"alert,omitempty"`
	// Users are, for an alert, the users the agent saw running the
	// program (or whose execution of it was blocked). It never leaves the
	// agent: the local API shows the alert to them and to administrators
	// only.
	Users []uint32 `json:"-"`
}

// Alert is a reputation verdict the person should know about. Its text is
// built from the agent's own facts (the path it saw, the verdict, where
// the verdict came from), never from strings the server chose.
type Alert struct {
	// ID increases with every alert the agent raises, so a client can
	// tell which alerts it has already shown.
	ID      uint64    `json:"id,omitempty"`
	Time    time.Time `json:"time,omitzero"`
	SHA256  string    `json:"sha256"`
	Path    string    `json:"path"`    // anonymised path of the program
	Program string    `json:"program"` // base name, for the notification
	Verdict string    `json:"verdict"` // "malicious" or "untrusted"
	// Source is where the verdict came from ("feed", "analyst", …).
	Source string `json:"source,omitempty"`
	// Action is what the agent did: AlertActionAlerted (the program ran)
	// or AlertActionBlocked (its execution was denied).
	Action string `json:"action,omitempty"`
}

// What the agent did about an alert.
const (
	AlertActionAlerted = "alerted"
	AlertActionBlocked = "blocked"
)

// AlertList is the answer to GET /v1/alerts: the recent alerts the caller
// may see, newest first (root and the admin group see all; others see the
// alerts of programs they ran).
type AlertList struct {
	Alerts []Alert `json:"alerts"`
}

// ProtectionInfo is the protection part of the status: whether programs
// the Security Network knows to be malicious are blocked before they run.
type ProtectionInfo struct {
	// Mode is the policy's "block" or "alert".
	Mode string `json:"mode"`
	// Active is true while executions are checked before they run (the
	// person participates, Mode is "block" and the kernel supports it).
	Active bool `json:"active"`
	// Reason says why blocking is not active when Mode is "block".
	Reason string `json:"reason,omitempty"`
	// Blocked counts programs denied; Held counts executions held while
	// the cloud was asked.
	Blocked uint64 `json:"blocked"`
	Held    uint64 `json:"held"`
	// LastBlock is the most recent block the caller may see.
	LastBlock *Alert `json:"last_block,omitempty"`
	// Exceptions is the number of local exceptions (cloudprotect allow).
	Exceptions int `json:"exceptions"`
}

// Exception is a program an administrator allowed on this machine whatever
// the Security Network says (cloudprotect allow).
type Exception struct {
	SHA256 string    `json:"sha256"`
	Reason string    `json:"reason"`
	Added  time.Time `json:"added,omitzero"`
	// UID is who added it.
	UID int `json:"uid"`
}

// ExceptionRequest is the body of PUT /v1/exceptions: add (or, with
// Remove, remove) a local exception.
type ExceptionRequest struct {
	SHA256 string `json:"sha256"`
	Reason string `json:"reason,omitempty"`
	Remove bool   `json:"remove,omitempty"`
}

// ExceptionList is the answer to GET /v1/exceptions.
type ExceptionList struct {
	Exceptions []Exception `json:"exceptions"`
}

// Error is the body of every error answer.
type Error struct {
	Error string `json:"error"`
	Hint  string `json:"hint,omitempty"`
	// Upload is, for POST /v1/upload, what was sent and refused before
	// the error stopped the sending.
	Upload *UploadResult `json:"upload,omitempty"`
}
