package localapi

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cloudprotect/cloudprotect/agent/api"
)

// The streamed queue answer is the JSON of the whole preview: its records
// in order, then the batch ID, the statement version and the totals; an
// empty queue gives an empty list; an error before the first record is an
// error answer with a hint.
func TestStreamQueue(t *testing.T) {
	for _, tc := range []struct {
		name    string
		preview api.QueuePreview
	}{
		{"records", bigPreview(300, 40)},
		{"empty", api.QueuePreview{Records: []api.QueueRecord{}, StatementVersion: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newFakeBackend()
			b.preview = tc.preview
			rec := httptest.NewRecorder()
			started, err := streamQueue(t.Context(), rec, time.Second, b)
			if err != nil || !started {
				t.Fatalf("streamQueue = %v, %v", started, err)
			}
			var got api.QueuePreview
			if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
				t.Fatalf("answer is not JSON: %v\n%s", err, rec.Body.String())
			}
			if !reflect.DeepEqual(got, tc.preview) {
				t.Errorf("decoded preview differs:\n got %+v\nwant %+v", got, tc.preview)
			}
			if !strings.HasPrefix(rec.Body.String(), `{"records":[`) {
				t.Errorf("answer starts %.40q", rec.Body.String())
			}
		})
	}
	b := newFakeBackend()
	b.previewErr = &HTTPError{Code: http.StatusInternalServerError, Msg: "read queue: damaged", Hint: "see the log"}
	s := NewServer(nil, b, func(c Cred) bool { return true }, nil)
	res := request(s, 0, http.MethodGet, "/v1/queue")
	var e api.Error
	if err := json.NewDecoder(res.Body).Decode(&e); err != nil || res.StatusCode != http.StatusInternalServerError || e.Hint == "" {
		t.Errorf("error answer: %d %+v %v", res.StatusCode, e, err)
	}
}
