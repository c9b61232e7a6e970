// Package wire holds the messages exchanged between the agent and the
// Security Network cloud: registration, statistics batches, deletion and
// reputation. Both sides encode and decode exactly these types, so the
// preview the agent shows is byte for byte what the server receives.
package wire

import (
	"time"
)

// Limits both sides enforce.
const (
	MaxBatchRecords    = 5000
	MaxBatchCompressed = 1 << 20 // bytes on the wire (gzip)
	MaxBatchDecoded    = 8 << 20 // bytes after gunzip
	MaxLookupHashes    = 1000
)

// Verdicts a reputation lookup can return.
const (
	VerdictTrusted   = "trusted"
	VerdictUntrusted = "untrusted"
	VerdictMalicious = "malicious"
	VerdictUnknown   = "unknown"
)

// Sources of a verdict, in Reputation.Source. Only curated sources, an
// analyst or an imported feed, ever say "malicious" or "trusted".
const (
	SourceAnalyst    = "analyst"    // an analyst of the network decided
	SourceFeed       = "feed"       // an imported feed lists the file
	SourcePrevalence = "prevalence" // the network's reports (untrusted or unknown only)
)

// ValidSource reports whether s is a source a verdict may carry.
func ValidSource(s string) bool {
	return s == SourceAnalyst || s == SourceFeed || s == SourcePrevalence
}

// MaxEnrollSecret bounds an enrollment secret, in bytes.
const MaxEnrollSecret = 256

// RegisterRequest is the body of POST /v1/installations. EnrollSecret is
// the private network's enrollment secret, when it asks for one.
type RegisterRequest struct {
	AgentVersion     string `json:"agent_version"`
	StatementVersion int    `json:"statement_version"`
	EnrollSecret     string `json:"enroll_secret,omitempty"`
}

// Registration is the answer to POST /v1/installations. The token
// authenticates every later request as "Authorization: Bearer <token>".
type Registration struct {
	InstallationID string `json:"installation_id"`
	Token          string `json:"token"`
}

// Batch is the body of POST /v1/statistics, gzip-compressed
// (Content-Encoding: gzip). BatchID is also sent as the Idempotency-Key
// header: a batch the server already accepted is not counted again.
type Batch struct {
	BatchID          string   `json:"batch_id"`
	StatementVersion int      `json:"statement_version"`
	Records          []Record `json:"records"`
}

// Record is the statistics of one executable, aggregated since the record
// was last sent. Every field is listed in the Security Network Statement.
type Record struct {
	Facts
	// ExecCount is the number of executions since the record was last sent.
	ExecCount uint64 `json:"exec_count"`
	// Loaded reports that the file appeared in a watched download folder.
	Loaded    bool      `json:"loaded"`
	FirstSeen time.Time `json:"first_seen"`
	LastSeen  time.Time `json:"last_seen"`
}

// BatchResult is the answer to POST /v1/statistics.
type BatchResult struct {
	Accepted  int  `json:"accepted"`
	Duplicate bool `json:"duplicate"` // the batch ID was seen before; nothing was counted
}

// LookupRequest is the body of POST /v1/reputation/sha256.
type LookupRequest struct {
	SHA256 []string `json:"sha256"`
}

// Reputation is the verdict on one file. Source says where the verdict
// came from (SourceAnalyst, SourceFeed, SourcePrevalence) and DecidedAt
// when: for an analyst or a feed, when the decision or the import was
// made; for prevalence, when the answer was computed.
type Reputation struct {
	SHA256     string     `json:"sha256"`
	Verdict    string     `json:"verdict"`
	Source     string     `json:"source,omitempty"`
	DecidedAt  *time.Time `json:"decided_at,omitempty"`
	Prevalence int        `json:"prevalence"` // installations that reported it
	FirstSeen  *time.Time `json:"first_seen,omitempty"`
	TTLSeconds int        `json:"ttl_seconds"` // how long the agent may cache it
}

// ValidVerdict reports whether v is one of the four verdicts.
func ValidVerdict(v string) bool {
	return v == VerdictTrusted || v == VerdictUntrusted || v == VerdictMalicious || v == VerdictUnknown
}

// LookupResponse is the answer to POST /v1/reputation/sha256.
type LookupResponse struct {
	Results []Reputation `json:"results"`
}

// Error is the body of every error answer.
type Error struct {
	Error string `json:"error"`
	Hint  string `json:"hint,omitempty"`
}
