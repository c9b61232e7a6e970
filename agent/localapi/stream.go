package localapi

import (
	"bufio"
	"encoding"
	"encoding/json"
	"io"
	"net/http"
	"reflect"
	"strings"
	"time"
)

// streamJSON writes v as json.Marshal would (compact, one line), except
// that lists inside structs are written one element at a time: a large
// answer never lies whole in memory as encoded bytes, whatever its shape.
// Each write must reach the client within timeout, or the connection is
// given up: a client that asks and does not read costs a bounded buffer
// and a bounded time.
func streamJSON(w http.ResponseWriter, timeout time.Duration, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	bw := bufio.NewWriterSize(&deadlineWriter{w: w, rc: rc, timeout: timeout}, 32<<10)
	if err := encodeValue(bw, reflect.ValueOf(v)); err != nil {
		return err
	}
	if err := bw.WriteByte('\n'); err != nil {
		return err
	}
	return bw.Flush()
}

// deadlineWriter gives every write to the client its own deadline.
type deadlineWriter struct {
	w       io.Writer
	rc      *http.ResponseController
	timeout time.Duration
}

func (d *deadlineWriter) Write(p []byte) (int, error) {
	d.rc.SetWriteDeadline(time.Now().Add(d.timeout))
	n, err := d.w.Write(p)
	if err == nil {
		err = d.rc.Flush()
	}
	return n, err
}

var (
	jsonMarshaler = reflect.TypeFor[json.Marshaler]()
	textMarshaler = reflect.TypeFor[encoding.TextMarshaler]()
)

// encodeValue writes v's JSON to w. Structs without embedded fields are
// walked field by field and slices element by element; everything else
// is left to encoding/json, so the bytes are json.Marshal's.
func encodeValue(w *bufio.Writer, v reflect.Value) error {
	if !v.IsValid() {
		_, err := w.WriteString("null")
		return err
	}
	t := v.Type()
	if t.Implements(jsonMarshaler) || t.Implements(textMarshaler) ||
		reflect.PointerTo(t).Implements(jsonMarshaler) || reflect.PointerTo(t).Implements(textMarshaler) {
		return marshalTo(w, v)
	}
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface:
		if v.IsNil() {
			_, err := w.WriteString("null")
			return err
		}
		return encodeValue(w, v.Elem())
	case reflect.Slice:
		if v.IsNil() {
			_, err := w.WriteString("null")
			return err
		}
		if t.Elem().Kind() == reflect.Uint8 {
			return marshalTo(w, v) // base64
		}
		return encodeList(w, v)
	case reflect.Array:
		if t.Elem().Kind() == reflect.Uint8 {
			return marshalTo(w, v)
		}
		return encodeList(w, v)
	case reflect.Struct:
		return encodeStruct(w, v)
	}
	return marshalTo(w, v)
}

func encodeList(w *bufio.Writer, v reflect.Value) error {
	if err := w.WriteByte('['); err != nil {
		return err
	}
	for i := range v.Len() {
		if i > 0 {
			if err := w.WriteByte(','); err != nil {
				return err
			}
		}
		if err := encodeValue(w, v.Index(i)); err != nil {
			return err
		}
	}
	return w.WriteByte(']')
}

func encodeStruct(w *bufio.Writer, v reflect.Value) error {
	t := v.Type()
	for i := range t.NumField() {
		f := t.Field(i)
		// Embedded fields and the ",string" option follow rules of their
		// own: such a struct is left to encoding/json whole.
		if f.Anonymous || strings.Contains(f.Tag.Get("json"), ",string") {
			return marshalTo(w, v)
		}
	}
	if err := w.WriteByte('{'); err != nil {
		return err
	}
	first := true
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("json")
		if tag == "-" {
			continue
		}
		name, opts, _ := strings.Cut(tag, ",")
		if name == "" {
			name = f.Name
		}
		fv := v.Field(i)
		if hasOpt(opts, "omitempty") && emptyValue(fv) || hasOpt(opts, "omitzero") && zeroValue(fv) {
			continue
		}
		if !first {
			if err := w.WriteByte(','); err != nil {
				return err
			}
		}
		first = false
		key, err := json.Marshal(name)
		if err != nil {
			return err
		}
		w.Write(key)
		if err := w.WriteByte(':'); err != nil {
			return err
		}
		if err := encodeValue(w, fv); err != nil {
			return err
		}
	}
	return w.WriteByte('}')
}

func hasOpt(opts, name string) bool {
	for opts != "" {
		var o string
		o, opts, _ = strings.Cut(opts, ",")
		if o == name {
			return true
		}
	}
	return false
}

// emptyValue is encoding/json's rule for omitempty.
func emptyValue(v reflect.Value) bool {
	switch v.Kind() {
	case reflect.Array, reflect.Map, reflect.Slice, reflect.String:
		return v.Len() == 0
	case reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr,
		reflect.Float32, reflect.Float64, reflect.Interface, reflect.Pointer:
		return v.IsZero()
	}
	return false
}

// zeroValue is encoding/json's rule for omitzero: the type's IsZero
// method if it has one, else the zero value.
func zeroValue(v reflect.Value) bool {
	if m := v.MethodByName("IsZero"); m.IsValid() && m.Type().NumIn() == 0 && m.Type().NumOut() == 1 &&
		m.Type().Out(0).Kind() == reflect.Bool {
		if v.Kind() == reflect.Pointer && v.IsNil() {
			return true
		}
		return m.Call(nil)[0].Bool()
	}
	return v.IsZero()
}

func marshalTo(w *bufio.Writer, v reflect.Value) error {
	// An addressable value is marshalled through its address, so that
	// methods on the pointer are used as encoding/json would.
	if v.CanAddr() {
		v = v.Addr()
	}
	b, err := json.Marshal(v.Interface())
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}
