//! Enums that travel as one byte: `u8_enum!` declares the enum with its
//! tags as explicit discriminants and derives `TryFrom<u8>` (the unknown
//! byte as the error) from the same list, so the table is written once.

/// Declare a `#[repr(u8)]` enum whose variants carry their wire tags, with
/// `TryFrom<u8>` generated from the same list.
macro_rules! u8_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $tag:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(u8)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $tag ),+
        }

        impl TryFrom<u8> for $name {
            type Error = u8;

            fn try_from(tag: u8) -> std::result::Result<Self, u8> {
                match tag {
                    $( $tag => Ok($name::$variant), )+
                    other => Err(other),
                }
            }
        }
    };
}

pub(crate) use u8_enum;
