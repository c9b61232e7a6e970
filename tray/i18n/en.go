package i18n

// en is the English catalog: English messages are their own keys, so it
// holds only the messages whose words depend on a number.
var en = Catalog{
	Plurals: map[Key]Forms{
		"%d records refused by the server and dropped": {Arg: 1,
			One:   "%d record refused by the server and dropped",
			Other: "%d records refused by the server and dropped"},
		"%d new detections": {Arg: 1,
			One:   "%d new detection",
			Other: "%d new detections",
		},
		"The Security Network reported %d programs on this computer as dangerous. Open the cloud icon's menu to see them.": {Arg: 1,
			One:   "The Security Network reported %d program on this computer as dangerous. Open the cloud icon's menu to see it.",
			Other: "The Security Network reported %d programs on this computer as dangerous. Open the cloud icon's menu to see them.",
		},
		"%d programs waiting to be sent": {Arg: 1,
			One:   "%d program waiting to be sent",
			Other: "%d programs waiting to be sent"},
		"Installed cloudprotect in %s (%d files written).\n": {Arg: 2,
			One:   "Installed cloudprotect in %s (%d file written).\n",
			Other: "Installed cloudprotect in %s (%d files written).\n"},
		"Removed cloudprotect from %s (%d files).\n": {Arg: 2,
			One:   "Removed cloudprotect from %s (%d file).\n",
			Other: "Removed cloudprotect from %s (%d files).\n"},
	},
}
