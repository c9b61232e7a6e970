package cloud_test

import (
	"net/http"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/cloud"
)

func TestParseRetryAfter(t *testing.T) {
	t.Parallel()
	now := start
	tests := []struct {
		name, v string
		want    time.Duration
	}{
		{"empty", "", 0},
		{"seconds", "120", 120 * time.Second},
		{"zero", "0", 0},
		{"negative", "-5", 0},
		{"huge", "999999999999", 7 * 24 * time.Hour},
		{"date", now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{"past date", now.Add(-time.Hour).Format(http.TimeFormat), 0},
		{"garbage", "soon", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := cloud.ParseRetryAfter(tt.v, now); got != tt.want {
				t.Errorf("ParseRetryAfter(%q) = %s; want %s", tt.v, got, tt.want)
			}
		})
	}
}
