package verdict

import (
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/server/store"
	"github.com/cloudprotect/cloudprotect/wire"
)

func TestDecide(t *testing.T) {
	t.Parallel()
	rules := Rules{TrustedPrevalence: 3, ListedTTL: 24 * time.Hour, UnknownTTL: time.Hour}
	first := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		name    string
		in      store.FileInfo
		want    string
		wantTTL int
	}{
		{"never seen", store.FileInfo{}, wire.VerdictUnknown, 3600},
		{"rare", store.FileInfo{Prevalence: 2}, wire.VerdictUnknown, 3600},
		{"prevalent", store.FileInfo{Prevalence: 3}, wire.VerdictTrusted, 3600},
		{"malformed beats prevalence", store.FileInfo{Prevalence: 100, Malformed: true}, wire.VerdictUntrusted, 3600},
		{"trusted list beats malformed", store.FileInfo{Trusted: true, Malformed: true}, wire.VerdictTrusted, 86400},
		{"untrusted beats trusted", store.FileInfo{Trusted: true, Untrusted: true}, wire.VerdictUntrusted, 86400},
		{"malicious beats all", store.FileInfo{Trusted: true, Untrusted: true, Malicious: true, Prevalence: 100}, wire.VerdictMalicious, 86400},
		{"malicious unseen", store.FileInfo{Malicious: true}, wire.VerdictMalicious, 86400},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := rules.Decide(tc.in)
			if got.Verdict != tc.want || got.TTLSeconds != tc.wantTTL {
				t.Errorf("Decide = %s ttl %d; want %s ttl %d", got.Verdict, got.TTLSeconds, tc.want, tc.wantTTL)
			}
		})
	}
	t.Run("prevalence rule off", func(t *testing.T) {
		t.Parallel()
		if got := (Rules{}).Decide(store.FileInfo{Prevalence: 1000}); got.Verdict != wire.VerdictUnknown {
			t.Errorf("with TrustedPrevalence 0, verdict = %s; want unknown", got.Verdict)
		}
	})
	t.Run("first seen", func(t *testing.T) {
		t.Parallel()
		got := rules.Decide(store.FileInfo{SHA256: "x", Prevalence: 1, FirstSeen: first})
		if got.FirstSeen == nil || !got.FirstSeen.Equal(first) || got.SHA256 != "x" || got.Prevalence != 1 {
			t.Errorf("Decide = %+v; want sha256, prevalence and first seen copied", got)
		}
		if got := rules.Decide(store.FileInfo{}); got.FirstSeen != nil {
			t.Errorf("unseen file has first_seen %v; want none", got.FirstSeen)
		}
	})
}
