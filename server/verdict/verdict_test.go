package verdict

import (
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/wire"
)

func TestDecide(t *testing.T) {
	t.Parallel()
	rules := Rules{MalformedQuorum: 3, ListedTTL: 24 * time.Hour, UnknownTTL: time.Hour}
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	first := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	fed := now.Add(-48 * time.Hour)
	decided := now.Add(-time.Hour)
	feed := func(list string) store.Listing { return store.Listing{List: list, Feed: "bazaar", AddedAt: fed} }
	analyst := &store.Decision{Verdict: wire.VerdictTrusted, Analyst: "ana", Reason: "vendor build", DecidedAt: decided}
	tests := []struct {
		name       string
		in         store.FileInfo
		want       string
		wantSource string
		wantAt     time.Time
		wantTTL    int
	}{
		{"never seen", store.FileInfo{}, wire.VerdictUnknown, wire.SourcePrevalence, now, 3600},
		{"common is not trusted by counts", store.FileInfo{Prevalence: 5000}, wire.VerdictUnknown, wire.SourcePrevalence, now, 3600},
		{"one malformed report", store.FileInfo{Prevalence: 900, Malformed: true, Established: 800, MalformedEstablished: 0}, wire.VerdictUnknown, wire.SourcePrevalence, now, 3600},
		{"malformed by fresh installations only", store.FileInfo{Prevalence: 50, Malformed: true}, wire.VerdictUnknown, wire.SourcePrevalence, now, 3600},
		{"malformed quorum but a minority", store.FileInfo{Prevalence: 100, Malformed: true, Established: 90, MalformedEstablished: 5}, wire.VerdictUnknown, wire.SourcePrevalence, now, 3600},
		{"malformed quorum and majority", store.FileInfo{Prevalence: 4, Malformed: true, Established: 4, MalformedEstablished: 3}, wire.VerdictUntrusted, wire.SourcePrevalence, now, 3600},
		{"below quorum", store.FileInfo{Prevalence: 2, Malformed: true, Established: 2, MalformedEstablished: 2}, wire.VerdictUnknown, wire.SourcePrevalence, now, 3600},
		{"feed trusted beats malformed", store.FileInfo{Listings: []store.Listing{feed("trusted")}, Malformed: true, Established: 4, MalformedEstablished: 4}, wire.VerdictTrusted, wire.SourceFeed, fed, 86400},
		{"untrusted feed beats trusted feed", store.FileInfo{Listings: []store.Listing{feed("trusted"), feed("untrusted")}}, wire.VerdictUntrusted, wire.SourceFeed, fed, 86400},
		{"malicious feed beats all feeds", store.FileInfo{Listings: []store.Listing{feed("trusted"), feed("malicious"), feed("untrusted")}}, wire.VerdictMalicious, wire.SourceFeed, fed, 86400},
		{"analyst beats feeds", store.FileInfo{Listings: []store.Listing{feed("malicious")}, Decision: analyst}, wire.VerdictTrusted, wire.SourceAnalyst, decided, 86400},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := rules.Decide(tc.in, now)
			if got.Verdict != tc.want || got.Source != tc.wantSource || got.TTLSeconds != tc.wantTTL ||
				got.DecidedAt == nil || !got.DecidedAt.Equal(tc.wantAt) {
				t.Errorf("Decide = %s from %s at %v ttl %d; want %s from %s at %v ttl %d",
					got.Verdict, got.Source, got.DecidedAt, got.TTLSeconds, tc.want, tc.wantSource, tc.wantAt, tc.wantTTL)
			}
		})
	}
	t.Run("malformed rule off", func(t *testing.T) {
		t.Parallel()
		in := store.FileInfo{Prevalence: 10, Malformed: true, Established: 10, MalformedEstablished: 10}
		if got := (Rules{}).Decide(in, now); got.Verdict != wire.VerdictUnknown {
			t.Errorf("with MalformedQuorum 0, verdict = %s; want unknown", got.Verdict)
		}
	})
	t.Run("first seen", func(t *testing.T) {
		t.Parallel()
		got := rules.Decide(store.FileInfo{SHA256: "x", Prevalence: 1, FirstSeen: first}, now)
		if got.FirstSeen == nil || !got.FirstSeen.Equal(first) || got.SHA256 != "x" || got.Prevalence != 1 {
			t.Errorf("Decide = %+v; want sha256, prevalence and first seen copied", got)
		}
		if got := rules.Decide(store.FileInfo{}, now); got.FirstSeen != nil {
			t.Errorf("unseen file has first_seen %v; want none", got.FirstSeen)
		}
	})
}
