package desktoptest

import (
	"fmt"

	"github.com/godbus/dbus/v5"
)

// Item reads and clicks a StatusNotifierItem, as a panel does.
type Item struct {
	conn *dbus.Conn
	reg  Registration
}

// NewItem returns a client of the registered item, talking over conn.
func NewItem(conn *dbus.Conn, reg Registration) *Item { return &Item{conn: conn, reg: reg} }

func (it *Item) prop(name string) (dbus.Variant, error) {
	return it.conn.Object(it.reg.Service, it.reg.Path).GetProperty("org.kde.StatusNotifierItem." + name)
}

// Title returns the item's title.
func (it *Item) Title() (string, error) {
	v, err := it.prop("Title")
	if err != nil {
		return "", err
	}
	s, _ := v.Value().(string)
	return s, nil
}

// Tooltip returns the tooltip's title text.
func (it *Item) Tooltip() (string, error) {
	v, err := it.prop("ToolTip")
	if err != nil {
		return "", err
	}
	var tt struct {
		Name  string
		Icons []struct {
			W, H int32
			Pix  []byte
		}
		Title, Body string
	}
	if err := dbus.Store([]any{v.Value()}, &tt); err != nil {
		return "", fmt.Errorf("decode tooltip: %w", err)
	}
	return tt.Title, nil
}

// Pixmap is an icon image as StatusNotifierItem sends it: ARGB32, network
// byte order.
type Pixmap struct {
	W, H int32
	Pix  []byte
}

// Icon returns the first IconPixmap.
func (it *Item) Icon() (Pixmap, error) {
	v, err := it.prop("IconPixmap")
	if err != nil {
		return Pixmap{}, err
	}
	var px []Pixmap
	if err := dbus.Store([]any{v.Value()}, &px); err != nil {
		return Pixmap{}, fmt.Errorf("decode icon: %w", err)
	}
	if len(px) == 0 {
		return Pixmap{}, fmt.Errorf("no icon pixmap")
	}
	return px[0], nil
}

// MenuEntry is one item of the menu.
type MenuEntry struct {
	ID          int32
	Type        string // "separator" or ""
	Label       string
	Enabled     bool
	Visible     bool
	ToggleType  string
	ToggleState int32
}

type layout struct {
	ID       int32
	Props    map[string]dbus.Variant
	Children []dbus.Variant
}

// Menu reads the whole menu with GetLayout and returns its entries in order.
func (it *Item) Menu() ([]MenuEntry, error) {
	var rev uint32
	var root layout
	obj := it.conn.Object(it.reg.Service, it.reg.Path+"/menu")
	if err := obj.Call("com.canonical.dbusmenu.GetLayout", 0, int32(0), int32(-1), []string{}).Store(&rev, &root); err != nil {
		return nil, fmt.Errorf("GetLayout: %w", err)
	}
	var out []MenuEntry
	for _, c := range root.Children {
		var l layout
		if err := dbus.Store([]any{c.Value()}, &l); err != nil {
			return nil, fmt.Errorf("decode menu entry: %w", err)
		}
		e := MenuEntry{ID: l.ID, Enabled: true, Visible: true}
		for k, v := range l.Props {
			switch k {
			case "type":
				e.Type, _ = v.Value().(string)
			case "label":
				e.Label, _ = v.Value().(string)
			case "enabled":
				e.Enabled, _ = v.Value().(bool)
			case "visible":
				e.Visible, _ = v.Value().(bool)
			case "toggle-type":
				e.ToggleType, _ = v.Value().(string)
			case "toggle-state":
				switch s := v.Value().(type) {
				case int32:
					e.ToggleState = s
				case int:
					e.ToggleState = int32(s)
				}
			}
		}
		out = append(out, e)
	}
	return out, nil
}

// Find returns the entry whose label starts with prefix.
func Find(menu []MenuEntry, prefix string) (MenuEntry, bool) {
	for _, e := range menu {
		if e.Type != "separator" && len(e.Label) >= len(prefix) && e.Label[:len(prefix)] == prefix {
			return e, true
		}
	}
	return MenuEntry{}, false
}

// Click sends a click on the menu entry id.
func (it *Item) Click(id int32) error {
	obj := it.conn.Object(it.reg.Service, it.reg.Path+"/menu")
	return obj.Call("com.canonical.dbusmenu.Event", 0, id, "clicked", dbus.MakeVariant(int32(0)), uint32(0)).Err
}
