// Package icons holds the tray's status icons: a cloud mark with a badge
// for each protection state, drawn in src/ as SVG and embedded here as PNG
// at panel and theme sizes and as ICO for Windows.
//
// The images are generated from the sources by `make icons`
// (go run ./icons/internal/gen, which needs rsvg-convert) and committed, so
// building the tray needs no rasteriser.
package icons

import (
	"embed"
	"fmt"
)

//go:generate go run ./internal/gen -dir .

// State is what an icon says about cloud protection.
type State string

// The states the tray can show.
const (
	// Participating: protected and participating in the Security Network.
	Participating State = "participating"
	// Declined: not participating; nothing is collected or sent.
	Declined State = "declined"
	// Undecided: the person has not answered yet (or must accept a new
	// statement); the agent needs their answer.
	Undecided State = "undecided"
	// Limited: participating, but the agent sees less than it should.
	Limited State = "limited"
	// Unreachable: no agent answers on the local socket.
	Unreachable State = "unreachable"
	// Threat: a dangerous program was detected or blocked, and the person
	// has not seen it yet.
	Threat State = "threat"
)

// States lists every state, in the order the documentation shows them.
var States = []State{Participating, Declined, Undecided, Limited, Unreachable, Threat}

// Sizes lists the embedded PNG sizes in pixels, smallest first.
var Sizes = []int{16, 22, 24, 32, 48, 64, 256}

//go:embed png/*.png ico/*.ico src/*.svg
var files embed.FS

// PNG returns the icon for state at size×size pixels. When size is not one
// of Sizes it returns the smallest larger image (or the largest one), for
// the caller or the panel to scale. It returns nil for an unknown state.
func PNG(state State, size int) []byte {
	pick := Sizes[len(Sizes)-1]
	for _, s := range Sizes {
		if s >= size {
			pick = s
			break
		}
	}
	return read(fmt.Sprintf("png/%s-%d.png", state, pick))
}

// ICO returns the Windows icon for state, holding the 16 to 256 pixel
// images. It returns nil for an unknown state.
func ICO(state State) []byte {
	return read(fmt.Sprintf("ico/%s.ico", state))
}

// SVG returns the scalable drawing of state, for an icon theme's scalable
// folder. It returns nil for an unknown state.
func SVG(state State) []byte {
	return read(fmt.Sprintf("src/%s.svg", state))
}

func read(name string) []byte {
	b, err := files.ReadFile(name)
	if err != nil {
		return nil
	}
	return b
}
