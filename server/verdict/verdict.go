// Package verdict turns what the cloud knows about a file into the
// reputation an agent receives. The rules, in order, first match wins:
//
//  1. on the imported malicious list → malicious
//  2. on the imported untrusted list → untrusted
//  3. on the imported trusted list → trusted
//  4. an installation reported its ELF header malformed → untrusted
//  5. reported by at least TrustedPrevalence installations → trusted
//  6. otherwise → unknown
//
// Verdicts from lists change only on import and carry ListedTTL. Verdicts
// from rules 4 to 6 change as reports arrive and installations leave, so
// they carry UnknownTTL.
package verdict

import (
	"time"

	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Defaults for Rules.
const (
	DefaultTrustedPrevalence = 5
	DefaultListedTTL         = 24 * time.Hour
	DefaultUnknownTTL        = time.Hour
)

// Rules are the settings of the verdict rules.
type Rules struct {
	// TrustedPrevalence is how many installations must report an unlisted
	// file for it to be trusted; 0 turns rule 5 off.
	TrustedPrevalence int
	ListedTTL         time.Duration
	UnknownTTL        time.Duration
}

// Default returns the default rules.
func Default() Rules {
	return Rules{TrustedPrevalence: DefaultTrustedPrevalence, ListedTTL: DefaultListedTTL, UnknownTTL: DefaultUnknownTTL}
}

// Decide returns the reputation of one file.
func (r Rules) Decide(in store.FileInfo) wire.Reputation {
	rep := wire.Reputation{SHA256: in.SHA256, Prevalence: in.Prevalence}
	if !in.FirstSeen.IsZero() {
		first := in.FirstSeen.UTC()
		rep.FirstSeen = &first
	}
	listed := true
	switch {
	case in.Malicious:
		rep.Verdict = wire.VerdictMalicious
	case in.Untrusted:
		rep.Verdict = wire.VerdictUntrusted
	case in.Trusted:
		rep.Verdict = wire.VerdictTrusted
	default:
		listed = false
		switch {
		case in.Malformed:
			rep.Verdict = wire.VerdictUntrusted
		case r.TrustedPrevalence > 0 && in.Prevalence >= r.TrustedPrevalence:
			rep.Verdict = wire.VerdictTrusted
		default:
			rep.Verdict = wire.VerdictUnknown
		}
	}
	ttl := r.UnknownTTL
	if listed {
		ttl = r.ListedTTL
	}
	rep.TTLSeconds = int(ttl / time.Second)
	return rep
}
