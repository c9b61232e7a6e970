// Package verdict turns what the cloud knows about a file into the
// reputation an agent receives. docs/VERDICTS.md is the model; in short,
// the first rule that applies decides:
//
//  1. an analyst decided → that verdict (source "analyst")
//  2. a feed lists the file as malicious, else untrusted, else trusted →
//     that verdict (source "feed")
//  3. enough established installations found its ELF header malformed,
//     and they are at least half of the established ones that reported
//     it → untrusted (source "prevalence")
//  4. otherwise → unknown (source "prevalence")
//
// Counts alone never make a file trusted or malicious: only the curated
// sources of rules 1 and 2 do. Rule 3 counts only established
// installations (registered for a while and active on several days), so
// one installation, or many fresh ones, cannot move a verdict for others.
// Curated verdicts carry ListedTTL; rule-based ones UnknownTTL.
package verdict

import (
	"time"

	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/wire"
)

// Defaults for Rules.
const (
	DefaultMalformedQuorum = 3
	DefaultEstablishedAge  = 7 * 24 * time.Hour
	DefaultEstablishedDays = 3
	DefaultListedTTL       = 24 * time.Hour
	DefaultUnknownTTL      = time.Hour
)

// Rules are the settings of the verdict rules.
type Rules struct {
	// MalformedQuorum is how many established installations must find a
	// file's ELF header malformed before rule 3 calls it untrusted; 0
	// turns rule 3 off.
	MalformedQuorum int
	// EstablishedAge and EstablishedDays say which installations are
	// established: registered at least EstablishedAge ago and active on
	// at least EstablishedDays distinct days.
	EstablishedAge  time.Duration
	EstablishedDays int
	ListedTTL       time.Duration
	UnknownTTL      time.Duration
}

// Default returns the default rules.
func Default() Rules {
	return Rules{
		MalformedQuorum: DefaultMalformedQuorum,
		EstablishedAge:  DefaultEstablishedAge,
		EstablishedDays: DefaultEstablishedDays,
		ListedTTL:       DefaultListedTTL,
		UnknownTTL:      DefaultUnknownTTL,
	}
}

// Trust returns which installations count as established as of now.
func (r Rules) Trust(now time.Time) store.Trust {
	return store.Trust{Now: now, MinAge: r.EstablishedAge, MinActiveDays: r.EstablishedDays}
}

// Decide returns the reputation of one file as of now.
func (r Rules) Decide(in store.FileInfo, now time.Time) wire.Reputation {
	rep := wire.Reputation{SHA256: in.SHA256, Prevalence: in.Prevalence}
	if !in.FirstSeen.IsZero() {
		first := in.FirstSeen.UTC()
		rep.FirstSeen = &first
	}
	at := now.UTC()
	rep.Source = wire.SourcePrevalence
	rep.Verdict = wire.VerdictUnknown
	curated := true
	if d := in.Decision; d != nil {
		rep.Verdict, rep.Source, at = d.Verdict, wire.SourceAnalyst, d.DecidedAt
	} else if l, ok := firstListing(in); ok {
		rep.Verdict, rep.Source, at = l.List, wire.SourceFeed, l.AddedAt
	} else {
		curated = false
		if r.malformed(in) {
			rep.Verdict = wire.VerdictUntrusted
		}
	}
	at = at.UTC()
	rep.DecidedAt = &at
	ttl := r.UnknownTTL
	if curated {
		ttl = r.ListedTTL
	}
	rep.TTLSeconds = int(ttl / time.Second)
	return rep
}

// firstListing returns the listing that decides among the feeds:
// malicious before untrusted before trusted.
func firstListing(in store.FileInfo) (store.Listing, bool) {
	for _, list := range []string{store.ListMalicious, store.ListUntrusted, store.ListTrusted} {
		if l, ok := in.Listed(list); ok {
			return l, true
		}
	}
	return store.Listing{}, false
}

// malformed applies rule 3: a quorum of established installations found
// the ELF header malformed, and they are at least half of the established
// installations that reported the file.
func (r Rules) malformed(in store.FileInfo) bool {
	return r.MalformedQuorum > 0 && in.Malformed &&
		in.MalformedEstablished >= r.MalformedQuorum &&
		2*in.MalformedEstablished >= in.Established
}
